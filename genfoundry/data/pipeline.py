"""DataPipeline: transforms bound to shards, giving resumable batches on the accelerator.

Per sample, in CPU workers: read bytes, plan the size transforms, decode and resample once, draw the
batch transforms' parameters. Per batch, on the device: uint8 -> float, the batch transforms.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from genfoundry import metrics
from genfoundry.checkpoint import CheckpointError
from genfoundry.data.decode import JPEG_MAGIC, DecodeError, decode, image_size
from genfoundry.data.order import GlobalBatches, sample_seed
from genfoundry.data.transforms import (BatchTransform, Lambda, Normalize, RandomHorizontalFlip, SizeTransform,
                                        compose_plans)
from genfoundry.errors import ConfigError
from genfoundry.shards.index import ShardError

FORMAT_VERSION = 3  # 2: the order comes from seeding.mix; 3: num_samples counts trained samples only


@dataclass
class Batch:
    images: torch.Tensor   # float [B, C, H, W] on the device, after the batch transforms
    labels: torch.Tensor   # int64 [B] on the device (-1 where a sample has no label)
    keys: list[str]        # sample keys, for tracing a batch back to its shards
    indices: np.ndarray    # global sample indices


class DataPipeline:
    """An ordered list of transforms; `loader()` binds it to a dataset of shards."""

    def __init__(self, channels: int = 3, fast_jpeg: bool = False):
        """`fast_jpeg`: libjpeg-turbo's fast chroma upsampling on CPU decodes, about 40% less decode time
        for about 41 dB PSNR against the accurate decode (off by default)."""
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels, self.fast_jpeg = channels, fast_jpeg
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
        image = decode(data, box, out_size, self.channels, self.fast_jpeg)
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
        if x.device.type == "cpu":  # numpy asks the kernel for huge pages: a fresh batch then faults 500x less
            out = torch.from_numpy(np.empty(tuple(x.shape), dtype=np.float32))
        else:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for c in range(channels):  # shift + scale * x per channel: conversion, scale and shift in one pass
            torch.add(torch.tensor(shift[c]), x[:, c], alpha=scale[c], out=out[:, c])
        x = out
        for t, cols in transforms:
            x = t.apply(x, params[:, cols])
        return x

    def for_workers(self) -> DataPipeline:
        """A copy to send to spawned worker processes, which only plan sizes and draw parameters:
        callables (which need not pickle) are left behind, as they draw no parameters."""
        copy = DataPipeline(self.channels, self.fast_jpeg)
        copy.size_transforms = list(self.size_transforms)
        copy.batch_transforms = [t for t in self.batch_transforms if not isinstance(t, Lambda)]
        return copy

    def _param_columns(self) -> list[slice]:
        cols, start = [], 0
        for t in self.batch_transforms:
            cols.append(slice(start, start + t.num_params))
            start += t.num_params
        return cols

    def loader(self, dataset, global_batch_size: int, device="cpu", seed: int = 0, num_workers: int = 0,
               rank: int | None = None, world_size: int | None = None, prefetch: int = 2,
               window: int = 4096, gpu_decode: bool | None = None, accumulation: int = 1,
               decode_in_workers: bool = True, exclude=None) -> ShardLoader:
        """Binds the pipeline to a shard set. Each batch is one rank's micro-batch of a global batch
        (`accumulation` of them per global batch).

        `gpu_decode` None uses nvJPEG where torchvision can. With GPU decoding and `num_workers` > 0,
        `decode_in_workers` decodes in the (spawned) worker processes, several batches at once, and
        passes the decoded batches through CUDA IPC; False decodes in this process, one batch at a time.
        `exclude`: global sample indices never served (a validation hold-out, `order.held_out`).
        """
        from genfoundry import accel
        from genfoundry.data import gpu_decode as gpu

        device = torch.device(device)
        if gpu_decode and not gpu.available(device):
            raise ConfigError(f"GPU decoding needs a CUDA device and torchvision with CUDA; device is '{device}'")
        mode = "gpu" if device.type != "cpu" and gpu_decode is not False and gpu.available(device) else "cpu"
        if mode == "gpu" and device.index is None:  # workers must decode on this process's device
            device = torch.device(device.type, torch.cuda.current_device())
        return ShardLoader(self, dataset, global_batch_size, device, seed, num_workers,
                           accel.rank() if rank is None else rank,
                           accel.world_size() if world_size is None else world_size, prefetch, window, mode,
                           accumulation, decode_in_workers, exclude)


class _BatchReader(torch.utils.data.Dataset):
    """Item (epoch, k) = this rank's micro-batch k % accumulation of global batch k // accumulation of
    that epoch, prepared on the CPU (runs in workers, which compute and keep the epoch's order).

    mode "cpu": decode here, batch transforms on the device (the main process's CPU when there is no
    accelerator); "gpu": JPEGs leave as bytes with their planned crop box, to be decoded on the GPU
    (other formats are still decoded here), by this reader when it has a `decode_device`, else by the
    loader.
    """

    def __init__(self, pipeline, dataset, batches: GlobalBatches, rank, world_size, mode, accumulation=1,
                 decode_device: torch.device | None = None):
        self.pipeline, self.dataset, self.batches = pipeline, dataset, batches
        self.rank, self.world_size = rank, world_size
        self.mode, self.accumulation = mode, accumulation
        self.decode_device = decode_device
        self.epoch, self.order = None, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            self.epoch, self.order = epoch, self.batches.order(epoch)
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
            except (ShardError, OSError) as e:  # the shard, not the sample: stop, never substitute
                return ReadFailure(f"cannot read sample {index} of '{_name(self.dataset)}': "
                                   f"{getattr(e, 'strerror', None) or e}")
            keys[slot] = str(meta.get("key", index))
            labels[slot] = -1 if meta.get("label") is None else int(meta["label"])
            try:
                payloads[slot], params[slot] = self._payload(data, rng)
            except DecodeError as e:  # this sample's bytes: substituted below, counted and named
                failures[slot] = f"{type(e).__name__}: {e}"
        if failures:
            _substitute([payloads, params, labels], failures, keys)
        # Small columns as arrays, pickled inline: a tensor would cost a shared-memory segment apiece.
        p = np.asarray(params, dtype=np.float32).reshape(len(indices), -1)
        y = np.asarray(labels, dtype=np.int64)
        if self.mode == "gpu":
            # One byte tensor for all JPEGs (one shared-memory transfer), images for the rest.
            jpegs = [i for i, pl in enumerate(payloads) if pl[0] == "jpeg"]
            blob = torch.frombuffer(bytearray(b"".join(payloads[i][1] for i in jpegs)) or bytearray(1),
                                    dtype=torch.uint8)
            lengths = [len(payloads[i][1]) for i in jpegs]
            others = {i: torch.from_numpy(pl[1]) for i, pl in enumerate(payloads) if pl[0] == "image"}
            x = (blob, lengths, jpegs, [payloads[i][2] for i in jpegs], others)
            if self.decode_device is not None:
                x, failures = _decode_and_substitute(x, p, y, keys, failures, self.pipeline.channels,
                                                     self.decode_device)
        else:
            images = [pl[1] for pl in payloads]
            sizes = {im.shape for im in images}
            if len(sizes) > 1:
                (h0, w0, _), (h1, w1, _) = sorted(sizes)[:2]
                raise ShardError(f"samples of one batch have {len(sizes)} sizes (e.g. {w0}x{h0} and {w1}x{h1}); end "
                                 f"the pipeline's size transforms with CenterCrop or Resize((height, width))")
            x = torch.from_numpy(np.stack(images))
        return indices, x, p, y, keys, failures


@dataclass
class ReadFailure:
    """What a reader returns instead of a batch when a shard cannot be read: raised in the main process
    as one ShardError line (an exception raised in a worker would arrive wrapped in its traceback)."""

    message: str


def _decode_and_substitute(packed, params, labels, keys, failures, channels, device):
    """GPU-decodes a packed batch; a JPEG that only nvJPEG finds broken is substituted like the rest."""
    from genfoundry.data import gpu_decode

    images, late = gpu_decode.decode_packed(packed, len(keys), channels, device)
    if late:
        _substitute([images, params, labels], late, keys)
    return images, {**failures, **late}


def _gpu_worker_init(device: torch.device, worker_id: int) -> None:
    torch.set_num_threads(1)
    torch.cuda.set_device(device)


def _substitute(columns: list, failures: dict, keys: list) -> None:
    """A corrupt sample's slot takes the next good sample of the same batch: size and order stay exact.
    Columns are lists, arrays or tensors (a row is copied)."""
    n = len(columns[0])
    good = [i for i in range(n) if i not in failures]
    if not good:
        raise ShardError(f"every sample of a batch failed to decode, e.g. {keys[0]}: {next(iter(failures.values()))}")
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
                 accumulation: int = 1, decode_in_workers: bool = True, exclude=None):
        if isinstance(dataset, str):
            from genfoundry.shards import ShardDataset

            dataset = ShardDataset(dataset)
        self.pipeline, self.dataset, self.device, self.mode = pipeline, dataset, device, mode
        sizes = [int(s["num_samples"]) for s in dataset.shards]
        exclude = None if exclude is None else np.unique(np.asarray(exclude, dtype=np.int64))
        self.batches = GlobalBatches(sizes, global_batch_size, seed, window, exclude)
        self.local_batch_size = self.batches.local_batch_size(world_size, accumulation)
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.num_workers, self.prefetch = num_workers, prefetch
        # GPU decoding in the workers: each is a spawned process with its own CUDA context and decoder.
        self.worker_decode = mode == "gpu" and num_workers > 0 and decode_in_workers
        self.epoch, self.batch, self.micro = 0, 0, 0
        self.corrupt: Counter[str] = Counter()  # key -> times substituted
        self.corrupt_reasons: dict[str, str] = {}
        self.failure_log: Path | None = None  # where each substitution is appended as a JSON line
        self._iterator = None

    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "seed": self.batches.seed, "epoch": self.epoch,
                "batch": self.batch, "micro": self.micro, "accumulation": self.accumulation,
                "global_batch_size": self.batches.global_batch_size,
                "num_samples": self.batches.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("format_version", "seed", "global_batch_size", "num_samples"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise CheckpointError(f"data state was saved with {key} {state.get(key)}, this loader has {mine}")
        if state.get("micro", 0) and state.get("accumulation") != self.accumulation:
            raise ValueError("data state was saved in the middle of a global batch with another accumulation; "
                             "resume it with the same number of ranks and micro-batches")
        self.epoch, self.batch, self.micro = state["epoch"], state["batch"], state.get("micro", 0)
        self._iterator = None

    def __iter__(self):
        """Batches from the current position on, across epochs, through one pool of workers."""
        pipeline, decode_device, extra = self.pipeline, None, {}
        if self.worker_decode:  # CUDA cannot be used in a forked child of a process that has used it
            pipeline, decode_device = self.pipeline.for_workers(), self.device
            extra = {"multiprocessing_context": "spawn", "worker_init_fn": partial(_gpu_worker_init, self.device)}
        reader = _BatchReader(pipeline, self.dataset, self.batches, self.rank, self.world_size, self.mode,
                              self.accumulation, decode_device)
        stop = []
        loader = torch.utils.data.DataLoader(
            reader, batch_size=None, sampler=self._positions(stop), num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers else None, collate_fn=_collate,
            # nvJPEG reads the bytes from pageable memory itself: only decoded images are worth pinning.
            pin_memory=self.mode == "cpu" and self.device.type != "cpu", persistent_workers=False, **extra)
        items = iter(loader)
        try:
            for item in items:
                if isinstance(item, ReadFailure):
                    raise ShardError(item.message)
                batch = self._finish(*item)
                self.micro += 1
                if self.micro == self.accumulation:
                    self.batch, self.micro = self.batch + 1, 0
                    if self.batch == self.batches.batches_per_epoch:
                        self.epoch, self.batch = self.epoch + 1, 0
                yield batch
        finally:
            if self.worker_decode:
                # Take in the batches the workers have already sent before they exit: a CUDA tensor sent
                # through IPC and never received keeps its producer waiting, and warning, at exit.
                stop.append(True)
                with contextlib.suppress(Exception):  # nothing to report while closing down
                    for _ in items:
                        pass

    def _positions(self, stop: list):
        """(epoch, item) from the current position until `stop` is non-empty: the loader's sampler."""
        epoch, item = self.epoch, self.batch * self.accumulation + self.micro
        per_epoch = self.batches.batches_per_epoch * self.accumulation
        while not stop:
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

    def _record_failure(self, key: str, index: int, reason: str) -> None:
        """A sample that failed to decode: counted, warned about once, appended to `failure_log`."""
        self.corrupt[key] += 1
        self.corrupt_reasons[key] = reason
        if self.corrupt[key] == 1:
            warnings.warn(f"sample {key} of '{_name(self.dataset)}' failed to decode and was replaced by another sample "
                          f"of its batch: {reason}", stacklevel=2)
        if self.failure_log is not None:
            row = {"key": key, "index": index, "epoch": self.epoch, "rank": self.rank, "reason": reason}
            with open(self.failure_log, "a") as f:  # one short line per write: appends do not interleave
                f.write(json.dumps(row) + "\n")

    def _finish(self, indices, images, params, labels, keys, failures) -> Batch:
        if self.mode == "gpu" and not self.worker_decode:
            images, failures = _decode_and_substitute(images, params, labels, keys, failures,
                                                      self.pipeline.channels, self.device)
        metrics.report("data/corrupt_per_batch", len(failures))
        for slot, reason in failures.items():
            self._record_failure(keys[slot], int(indices[slot]), reason)
        x = images.to(self.device, non_blocking=True)
        p, y = (torch.from_numpy(a).to(self.device, non_blocking=True) for a in (params, labels))
        return Batch(self.pipeline.apply_batch(x, p), y, keys, np.asarray(indices))


def _name(dataset) -> str:
    return str(getattr(dataset, "url", type(dataset).__name__))


def _collate(item):
    return item  # batches are assembled in the reader; the loader only moves them between processes
