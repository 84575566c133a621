"""From a data config to what training needs: a resumable loader, the image shape, a fixed validation set."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from genfoundry import seeding
from genfoundry.data.loader import Loader
from genfoundry.data.memory import InMemoryLoader
from genfoundry.data.pipeline import DataPipeline
from genfoundry.data.transforms import CenterCrop, Normalize, RandomHorizontalFlip, Resize
from genfoundry.errors import ConfigError
from genfoundry.sources import SOURCES, SourceError, load_images

FOLDER_RESOLUTION = 64  # folders hold images of any size; this is the side they are brought to by default


@dataclass
class TrainingData:
    make_loader: Callable[[int, int, int], Loader]  # (rank, world_size, accumulation) -> that rank's loader
    name: str
    class_names: list[str]
    resolution: int
    channels: int
    val_images: np.ndarray     # uint8 [N, H, W, C], the same every time
    val_labels: np.ndarray
    notes: list[str] = field(default_factory=list)  # one line each: what was converted, left out or chosen

    @property
    def num_classes(self) -> int:
        return max(1, len(self.class_names))


def is_shard_set(source: str) -> bool:
    return "://" in source or (Path(source) / "index.json").is_file()


def training_data(cfg, global_batch_size: int, val_batch_size: int, seed: int, device) -> TrainingData:
    """`cfg` is a DataConfig: a named dataset, an image folder, or a packed shard set (path or URL)."""
    if is_shard_set(cfg.source):
        return _from_shards(cfg, global_batch_size, val_batch_size, seed, device)
    if cfg.source in SOURCES and (cfg.resolution or cfg.channels):
        raise ConfigError(f"'{cfg.source}' images are 28x28 grayscale; data.resolution and data.channels apply "
                          f"to folders and shards")
    train = load_images(cfg.source, cfg.split, cfg.resolution or FOLDER_RESOLUTION, cfg.channels or 3)
    try:
        val = load_images(cfg.source, cfg.val_split, cfg.resolution or FOLDER_RESOLUTION, cfg.channels or 3)
    except SourceError:
        val = train  # folders have no splits: the validation batch is then in-sample
    if len(train) < global_batch_size:
        raise SourceError(f"dataset '{train.name}' has {len(train)} images, fewer than one global batch of "
                          f"{global_batch_size}")

    def make_loader(rank, world_size, accumulation):
        return InMemoryLoader(train, global_batch_size, seed, device, cfg.hflip, rank, world_size, accumulation)

    n = min(val_batch_size, len(val))
    return TrainingData(make_loader, train.name, train.class_names, train.resolution, train.channels,
                        val.images[:n], val.labels[:n])


def _from_shards(cfg, global_batch_size, val_batch_size, seed, device) -> TrainingData:
    from genfoundry.data.decode import image_size
    from genfoundry.shards import ShardDataset

    dataset = ShardDataset(cfg.source)
    first, _ = dataset.read(0)
    channels = cfg.channels or _channels_of(first)
    resolution = cfg.resolution or min(image_size(first))

    train = shard_pipeline(resolution, channels, cfg.fast_jpeg, cfg.hflip)
    train.add_transform(Normalize([0.5] * channels, [0.5] * channels))

    def make_loader(rank, world_size, accumulation):
        return train.loader(dataset, global_batch_size, device, seed, cfg.workers, rank, world_size,
                            accumulation=accumulation)

    # The validation batch: the first global batch of another seed, without augmentation (in-sample).
    val_loader = shard_pipeline(resolution, channels, cfg.fast_jpeg).loader(dataset, min(val_batch_size, len(dataset)), "cpu", seeding.mix(seed, 1), 0, 0, 1)
    val = next(iter(val_loader))
    val_images = (val.images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return TrainingData(make_loader, Path(str(cfg.source).rstrip("/")).name, dataset.class_names or [""], resolution,
                        channels, val_images, val.labels.clamp(min=0).numpy())


def shard_pipeline(resolution: int, channels: int, fast_jpeg: bool = False, hflip: bool = False) -> DataPipeline:
    """How shard samples become training images: the short side resized to `resolution`, the centre
    square cropped (a no-op for images already at that size), optional random flips. Training, the
    validation batch and FID references all decode through it."""
    p = DataPipeline(channels, fast_jpeg).add_transform(Resize(resolution)).add_transform(CenterCrop(resolution))
    return p.add_transform(RandomHorizontalFlip()) if hflip else p


def _channels_of(data: bytes) -> int:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return 1 if im.mode in ("L", "1", "I;16") else 3
