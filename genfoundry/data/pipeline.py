"""DataPipeline: transforms bound to shards, giving resumable batches on the accelerator.

Per sample, in CPU workers: read bytes, plan the size transforms, decode and resample once, draw the
batch transforms' parameters. Per batch, on the device: uint8 -> float, the batch transforms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from genfoundry import metrics
from genfoundry.data.decode import JPEG_MAGIC, DecodeError, decode, image_size
from genfoundry.data.order import GlobalBatches, global_order, sample_seed
from genfoundry.data.transforms import (BatchTransform, Lambda, Normalize, RandomHorizontalFlip, SizeTransform,
                                        compose_plans)

FORMAT_VERSION = 1


@dataclass
class Batch:
    images: torch.Tensor   # float [B, C, H, W] on the device, after the batch transforms
    labels: torch.Tensor   # int64 [B] on the device (-1 where a sample has no label)
    keys: list[str]        # sample keys, for tracing a batch back to its shards
    indices: np.ndarray    # global sample indices


class DataPipeline:
    """An ordered list of transforms; `loader()` binds it to a dataset of shards."""

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels
        self.size_transforms: list[SizeTransform] = []
        self.batch_transforms: list[BatchTransform] = []

    def add_transform(self, transform) -> DataPipeline:
        if isinstance(transform, SizeTransform):
            if self.batch_transforms:
                raise ValueError(f"{type(transform).__name__} changes the image size and runs per sample in CPU "
                                 f"workers, before the batch transforms; add it before "
                                 f"{type(self.batch_transforms[0]).__name__}")
            self.size_transforms.append(transform)
        elif isinstance(transform, BatchTransform):
            self.batch_transforms.append(transform)
        elif callable(transform):
            self.batch_transforms.append(Lambda(transform))
        else:
            raise TypeError(f"a transform must be a genfoundry transform or a callable, got {type(transform).__name__}")
        return self

    def prepare(self, data: bytes, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
        """CPU half for one sample: fixed-size uint8 HWC and the batch transforms' parameters."""
        width, height = image_size(data)
        box, out_size = compose_plans(self.size_transforms, width, height, rng)
        image = decode(data, box, out_size, self.channels)
        params = [p for t in self.batch_transforms for p in t.params(rng)]
        return image, params

    def apply_batch(self, images_uint8: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Device half: uint8 NHWC -> float NCHW -> batch transforms.

        Leading flips run on the uint8 data (a quarter of the bytes), and a Normalize that follows them
        is folded into the conversion to float, so the common recipe costs one pass over the floats.
        """
        transforms = list(zip(self.batch_transforms, self._param_columns()))
        x = images_uint8
        while transforms and isinstance(transforms[0][0], RandomHorizontalFlip):
            t, cols = transforms.pop(0)
            x = t.apply(x.permute(0, 3, 1, 2), params[:, cols]).permute(0, 2, 3, 1)
        channels = x.shape[3]
        scale, shift = [1 / 255.0] * channels, [0.0] * channels
        if transforms and isinstance(transforms[0][0], Normalize):
            norm = transforms.pop(0)[0]
            scale = [1.0 / (255.0 * s) for s in norm.std]  # (x / 255 - mean) / std
            shift = [-m / s for m, s in zip(norm.mean, norm.std)]
        x = x.permute(0, 3, 1, 2).contiguous()  # NCHW uint8: a cheap transpose of the small tensor
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for c in range(channels):  # shift + scale * x per channel: conversion, scale and shift in one pass
            torch.add(torch.tensor(shift[c]), x[:, c], alpha=scale[c], out=out[:, c])
        x = out
        for t, cols in transforms:
            x = t.apply(x, params[:, cols])
        return x

    def _param_columns(self) -> list[slice]:
        cols, start = [], 0
        for t in self.batch_transforms:
            cols.append(slice(start, start + t.num_params))
            start += t.num_params
        return cols

    def loader(self, dataset, global_batch_size: int, device="cpu", seed: int = 0, num_workers: int = 0,
               rank: int | None = None, world_size: int | None = None, prefetch: int = 2,
               window: int = 4096, gpu_decode: bool | None = None, accumulation: int = 1) -> ShardLoader:
        """Binds the pipeline to a shard set. Each batch is one rank's micro-batch of a global batch
        (`accumulation` of them per global batch). `gpu_decode` None uses nvJPEG where torchvision can."""
        from genfoundry import accel
        from genfoundry.data import gpu_decode as gpu

        device = torch.device(device)
        if gpu_decode and not gpu.available(device):
            raise ValueError(f"GPU decoding needs a CUDA device and torchvision with CUDA; device is '{device}'")
        mode = "gpu" if device.type != "cpu" and gpu_decode is not False and gpu.available(device) else "cpu"
        return ShardLoader(self, dataset, global_batch_size, device, seed, num_workers,
                           accel.rank() if rank is None else rank,
                           accel.world_size() if world_size is None else world_size, prefetch, window, mode,
                           accumulation)


class _BatchReader(torch.utils.data.Dataset):
    """Item (epoch, k) = this rank's micro-batch k % accumulation of global batch k // accumulation of
    that epoch, prepared on the CPU (runs in workers, which compute and keep the epoch's order).

    mode "cpu": decode here, batch transforms on the device (the main process's CPU when there is no
    accelerator); "gpu": JPEGs leave as bytes with their planned crop box, to be decoded on the GPU
    (other formats are still decoded here).
    """

    def __init__(self, pipeline, dataset, batches: GlobalBatches, rank, world_size, mode, accumulation=1):
        self.pipeline, self.dataset, self.batches = pipeline, dataset, batches
        self.rank, self.world_size = rank, world_size
        self.mode, self.accumulation = mode, accumulation
        self.epoch, self.order = None, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            b = self.batches
            self.epoch, self.order = epoch, global_order(b.shard_sizes, b.seed, epoch, b.window)
        return self.order

    def _payload(self, data: bytes, rng):
        if self.mode == "gpu" and data[:2] == JPEG_MAGIC:
            width, height = image_size(data)
            plan = compose_plans(self.pipeline.size_transforms, width, height, rng)
            params = [p for t in self.pipeline.batch_transforms for p in t.params(rng)]
            return ("jpeg", data, plan), params
        image, params = self.pipeline.prepare(data, rng)
        return ("image", image, None), params

    def __getitem__(self, position):
        epoch, k = position
        batch, micro = divmod(k, self.accumulation)
        indices = self.batches.batch(self._order_of(epoch), batch, self.rank, self.world_size, micro,
                                     self.accumulation)
        payloads, params, labels, keys, failures = [], [], [], [], {}
        for slot, index in enumerate(indices):
            rng = sample_seed(self.batches.seed, epoch, int(index))
            keys.append(str(index))
            labels.append(-1)
            payloads.append(None)
            params.append(None)
            try:
                data, meta = self.dataset.read(int(index))
                keys[slot] = str(meta.get("key", index))
                labels[slot] = -1 if meta.get("label") is None else int(meta["label"])
                payloads[slot], params[slot] = self._payload(data, rng)
            except (DecodeError, ValueError, OSError) as e:
                failures[slot] = f"{type(e).__name__}: {e}"
        if failures:
            _substitute([payloads, params, labels], failures, keys)
        p = torch.tensor(params, dtype=torch.float32).reshape(len(indices), -1)
        y = torch.tensor(labels, dtype=torch.int64)
        if self.mode == "gpu":
            # One byte tensor for all JPEGs (one shared-memory transfer), images for the rest.
            jpegs = [i for i, pl in enumerate(payloads) if pl[0] == "jpeg"]
            blob = torch.frombuffer(bytearray(b"".join(payloads[i][1] for i in jpegs)) or bytearray(1),
                                    dtype=torch.uint8)
            lengths = [len(payloads[i][1]) for i in jpegs]
            others = {i: torch.from_numpy(pl[1]) for i, pl in enumerate(payloads) if pl[0] == "image"}
            x = (blob, lengths, jpegs, [payloads[i][2] for i in jpegs], others)
        else:
            images = [pl[1] for pl in payloads]
            sizes = {im.shape for im in images}
            if len(sizes) > 1:
                raise ValueError(f"samples of one batch have different sizes {sorted(sizes)}; end the size "
                                 f"transforms with a fixed-size crop or Resize((height, width))")
            x = torch.from_numpy(np.stack(images))
        return indices, x, p, y, keys, failures


def _substitute(columns: list, failures: dict, keys: list) -> None:
    """A corrupt sample's slot takes the next good sample of the same batch: size and order stay exact."""
    n = len(columns[0])
    good = [i for i in range(n) if i not in failures]
    if not good:
        raise ValueError(f"every sample of a batch failed to decode, e.g. {keys[0]}: {next(iter(failures.values()))}")
    for slot in failures:
        donor = next((g for g in good if g > slot), good[0])
        for column in columns:
            column[slot] = column[donor]


class ShardLoader:
    """Iterates batches forever, epoch after epoch; `state_dict()` is the global position.

    The position counts global batches handed out, so it does not depend on the world size or on the
    accumulation: a run resumed on another number of ranks continues the same global stream.
    Prefetched batches that were not handed out are not counted, and are read again after a resume.
    """

    def __init__(self, pipeline: DataPipeline, dataset, global_batch_size: int, device: torch.device, seed: int,
                 num_workers: int, rank: int, world_size: int, prefetch: int, window: int, mode: str = "cpu",
                 accumulation: int = 1):
        if isinstance(dataset, str):
            from genfoundry.shards import ShardDataset

            dataset = ShardDataset(dataset)
        self.pipeline, self.dataset, self.device, self.mode = pipeline, dataset, device, mode
        sizes = [int(s["num_samples"]) for s in dataset.shards]
        self.batches = GlobalBatches(sizes, global_batch_size, seed, window)
        self.local_batch_size = self.batches.local_batch_size(world_size, accumulation)
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.num_workers, self.prefetch = num_workers, prefetch
        self.epoch, self.batch, self.micro = 0, 0, 0
        self.corrupt: Counter[str] = Counter()  # key -> times substituted
        self.corrupt_reasons: dict[str, str] = {}
        self._iterator = None

    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "seed": self.batches.seed, "epoch": self.epoch,
                "batch": self.batch, "micro": self.micro, "accumulation": self.accumulation,
                "global_batch_size": self.batches.global_batch_size,
                "num_samples": sum(self.batches.shard_sizes)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "num_samples"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"data state was saved with {key} {state[key]}, this loader has {mine}")
        if state.get("micro", 0) and state.get("accumulation") != self.accumulation:
            raise ValueError("data state was saved in the middle of a global batch with another accumulation; "
                             "resume it with the same number of ranks and micro-batches")
        self.epoch, self.batch, self.micro = state["epoch"], state["batch"], state.get("micro", 0)
        self._iterator = None

    def __iter__(self):
        """Batches from the current position on, across epochs, through one pool of workers."""
        reader = _BatchReader(self.pipeline, self.dataset, self.batches, self.rank, self.world_size, self.mode,
                              self.accumulation)
        loader = torch.utils.data.DataLoader(
            reader, batch_size=None, sampler=self._positions(), num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers else None, collate_fn=_collate,
            # nvJPEG reads the bytes from pageable memory itself: only decoded images are worth pinning.
            pin_memory=self.mode == "cpu" and self.device.type != "cpu", persistent_workers=False)
        for item in loader:
            batch = self._finish(*item)
            self.micro += 1
            if self.micro == self.accumulation:
                self.batch, self.micro = self.batch + 1, 0
                if self.batch == self.batches.batches_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
            yield batch

    def _positions(self):
        """(epoch, item) from the current position, forever: the loader's sampler."""
        epoch, item = self.epoch, self.batch * self.accumulation + self.micro
        per_epoch = self.batches.batches_per_epoch * self.accumulation
        while True:
            yield epoch, item
            item += 1
            if item == per_epoch:
                epoch, item = epoch + 1, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the next batch: the interface the trainer uses."""
        if self._iterator is None:
            self._iterator = iter(self)
        b = next(self._iterator)
        return b.images, b.labels

    def _finish(self, indices, images, params, labels, keys, failures) -> Batch:
        if self.mode == "gpu":
            images, late = self._decode_on_device(images, len(indices))
            if late:  # failures only nvJPEG saw: substitute on the device
                rows = [images, params, labels]
                _substitute(rows, late, keys)
                images = torch.stack(rows[0]) if isinstance(rows[0], list) else rows[0]
                failures = {**failures, **late}
        metrics.report("data/corrupt_per_batch", len(failures))
        for slot, reason in failures.items():
            self.corrupt[keys[slot]] += 1
            self.corrupt_reasons[keys[slot]] = reason
        x, p, y = (t.to(self.device, non_blocking=True) for t in (images, params, labels))
        return Batch(self.pipeline.apply_batch(x, p), y, keys, np.asarray(indices))

    def _decode_on_device(self, packed, n: int):
        from genfoundry.data import gpu_decode

        blob, lengths, jpeg_slots, plans, others = packed
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        datas = [blob[starts[i]:starts[i + 1]] for i in range(len(lengths))]
        sizes = {tuple(pl[1]) for pl in plans} | {(im.shape[1], im.shape[0]) for im in others.values()}
        if len(sizes) > 1:
            raise ValueError(f"samples of one batch have different sizes {sorted(sizes)}; end the size "
                             f"transforms with a fixed-size crop or Resize((height, width))")
        w, h = sizes.pop()
        out = torch.empty((n, h, w, self.pipeline.channels), dtype=torch.uint8, device=self.device)
        late = {}
        if jpeg_slots:
            decoded, failed = gpu_decode.decode_batch(datas, plans, self.pipeline.channels, self.device)
            out[jpeg_slots] = decoded
            late = {jpeg_slots[i]: reason for i, reason in failed.items()}
        for slot, image in others.items():
            out[slot] = image.to(self.device, non_blocking=True)
        return (list(out.unbind(0)) if late else out), late


def _collate(item):
    return item  # batches are assembled in the reader; the loader only moves them between processes
