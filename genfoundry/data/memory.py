"""An in-memory loader whose order is a pure function of (seed, epoch), resumable from its state."""

from __future__ import annotations

import numpy as np
import torch

from genfoundry import seeding
from genfoundry.checkpoint import CheckpointError
from genfoundry.data.order import GlobalBatches, chunk_index
from genfoundry.sources import ImageSet, SourceError

FORMAT_VERSION = 3  # 3: the order comes from seeding.mix
ON_DEVICE_BYTES = 2 * 2**30  # in-memory datasets up to this size are held on the accelerator


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seeding.mix(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


class InMemoryLoader:
    """Yields (images in [-1, 1] NCHW float, labels) micro-batches; the position survives a checkpoint.

    Global batches of `global_batch_size` never straddle epochs (the partial one at the end is dropped),
    and are cut into chunks exactly as a shard set's are (`GlobalBatches`): rank r's micro-step j takes
    chunk j * world_size + r. The position counts global batches, so it does not depend on the split.
    """

    def __init__(self, images: ImageSet, global_batch_size: int, seed: int = 0, device=None, hflip: bool = False,
                 rank: int = 0, world_size: int = 1, accumulation: int = 1):
        if len(images) < global_batch_size:
            raise SourceError(f"dataset '{images.name}' has {len(images)} images, fewer than one batch of "
                             f"{global_batch_size}")
        self.images = torch.from_numpy(np.ascontiguousarray(images.images)).permute(0, 3, 1, 2)  # uint8 NCHW
        self.labels = torch.from_numpy(images.labels)
        self.global_batch_size, self.seed, self.hflip = global_batch_size, seed, hflip
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.micro_batch_size = GlobalBatches([len(images)], global_batch_size, seed).local_batch_size(
            world_size, accumulation)
        self.device = torch.device(device or "cpu")
        if self.device.type != "cpu" and self.images.numel() <= ON_DEVICE_BYTES:
            # Held on the accelerator: a batch is one gather there, with no copy from pageable host
            # memory (which would make every step wait for the device).
            self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self.epoch, self.batch, self.micro = 0, 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.images) // self.global_batch_size

    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "seed": self.seed, "epoch": self.epoch, "batch": self.batch,
                "micro": self.micro, "accumulation": self.accumulation, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("format_version", "seed", "global_batch_size"):
            if state.get(key) != self.state_dict()[key]:
                raise CheckpointError(f"data state was saved with {key} {state.get(key)}, this loader has "
                                 f"{self.state_dict()[key]}")
        if state["micro"] and state["accumulation"] != self.accumulation:
            raise ValueError("data state was saved in the middle of a global batch with another accumulation; "
                             "resume it with the same number of ranks and micro-batches")
        self.epoch, self.batch, self.micro = state["epoch"], state["batch"], state["micro"]
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return epoch_permutation(len(self.images), self.seed, epoch).to(self.images.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        m = self.micro_batch_size
        offset = chunk_index(self.rank, self.world_size, self.micro) * m
        start = self.batch * self.global_batch_size + offset
        idx = self._order[start:start + m]
        x = self.images[idx].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if self.hflip:
            # Drawn for the whole global batch and seeded by its position (which the checkpoint holds),
            # so flips survive a resume and do not depend on how the batch is split.
            gen = torch.Generator().manual_seed(seeding.mix(self.seed, self.epoch, self.batch))
            flip = (torch.rand(self.global_batch_size, generator=gen) < 0.5)[offset:offset + m]
            x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
        self.micro += 1
        if self.micro == self.accumulation:
            self.batch, self.micro = self.batch + 1, 0
        return x, self.labels[idx].to(self.device, non_blocking=True)

    def __iter__(self):
        while True:
            yield self.next_batch()
