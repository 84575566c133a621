"""An in-memory loader whose order is a pure function of (seed, epoch), resumable from its state."""

from __future__ import annotations

import numpy as np
import torch

from genfoundry.sources import ImageSet

FORMAT_VERSION = 1


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


class InMemoryLoader:
    """Yields (images in [-1, 1] NCHW float, labels) batches; the position survives a checkpoint.

    Batches never straddle epochs: the last partial batch of an epoch is dropped, so every batch has
    `batch_size` images and the global order stays a function of (seed, epoch, position).
    """

    def __init__(self, images: ImageSet, batch_size: int, seed: int = 0, device=None, hflip: bool = False):
        if len(images) < batch_size:
            raise ValueError(f"dataset '{images.name}' has {len(images)} images, fewer than one batch of {batch_size}")
        self.images = torch.from_numpy(np.ascontiguousarray(images.images)).permute(0, 3, 1, 2)  # uint8 NCHW
        self.labels = torch.from_numpy(images.labels)
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.device = torch.device(device or "cpu")
        self.epoch, self.position = 0, 0
        self._order = epoch_permutation(len(self.images), seed, 0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.images) // self.batch_size

    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = epoch_permutation(len(self.images), self.seed, self.epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = epoch_permutation(len(self.images), self.seed, self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        x = self.images[idx].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if self.hflip:
            # Seeded by the position, which the checkpoint holds, so flips survive a resume too.
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.position)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
        self.position += self.batch_size
        return x, self.labels[idx].to(self.device, non_blocking=True)

    def __iter__(self):
        while True:
            yield self.next_batch()
