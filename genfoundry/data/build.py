"""From a data config to what training needs: a resumable loader, the image shape, a fixed validation set."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from genfoundry.data import order
from genfoundry.data.loader import Loader
from genfoundry.data.memory import InMemoryLoader
from genfoundry.data.pipeline import DataPipeline
from genfoundry.data.transforms import CenterCrop, Normalize, RandomHorizontalFlip, Resize
from genfoundry.errors import ConfigError
from genfoundry.sources import SOURCES, ImageSet, SourceError, default_side, load_images


@dataclass
class TrainingData:
    make_loader: Callable[[int, int, int], Loader]  # (rank, world_size, accumulation) -> that rank's loader
    name: str
    class_names: list[str]
    resolution: int
    channels: int
    val_images: np.ndarray     # uint8 [N, H, W, C], the same every time
    val_labels: np.ndarray     # int64 [N]; -1 (no label) becomes the null class, num_classes, here
    notes: list[str] = field(default_factory=list)  # one line each: what was converted, left out or chosen

    def __post_init__(self):
        self.val_labels = np.where(self.val_labels < 0, self.num_classes, self.val_labels).astype(np.int64)

    @property
    def num_classes(self) -> int:
        return max(1, len(self.class_names))


def is_shard_set(source: str) -> bool:
    return "://" in source or (Path(source) / "index.json").is_file()


def training_data(cfg, global_batch_size: int, val_batch_size: int, seed: int, device) -> TrainingData:
    """`cfg` is a DataConfig: a named dataset, an image folder, or a packed shard set (path or URL).

    Named datasets validate on their `val_split`; folders and shard sets on a hold-out of `cfg.holdout`
    of their images that training never sees (`order.held_out`), or in-sample when it is 0."""
    if is_shard_set(cfg.source):
        return _from_shards(cfg, global_batch_size, val_batch_size, seed, device)
    if cfg.source in SOURCES:
        if cfg.resolution or cfg.channels:
            raise ConfigError(f"'{cfg.source}' images are 28x28 grayscale; data.resolution and data.channels "
                              f"apply to folders and shards")
        train, val = load_images(cfg.source, cfg.split), load_images(cfg.source, cfg.val_split)
        notes = [f"validation: {min(val_batch_size, len(val))} images of the '{cfg.val_split}' split"]
    else:
        images = load_images(cfg.source, resolution=cfg.resolution, channels=cfg.channels)
        held, notes = _holdout(len(images), cfg.holdout, val_batch_size, global_batch_size, images.name)
        notes = images.notes + notes  # what was left out, converted to the chosen channels or is unlabelled
        val = dataclasses.replace(images, images=images.images[held], labels=images.labels[held])
        if cfg.holdout:
            keep = np.setdiff1d(np.arange(len(images)), held, assume_unique=True)
            images = dataclasses.replace(images, images=images.images[keep], labels=images.labels[keep])
        train = images
    if len(train) < global_batch_size:
        raise SourceError(f"dataset '{train.name}' has {len(train)} training images, fewer than one global batch "
                          f"of {global_batch_size}; lower --train.global_batch_size")

    def make_loader(rank, world_size, accumulation):
        return InMemoryLoader(train, global_batch_size, seed, device, cfg.hflip, rank, world_size, accumulation)

    n = min(val_batch_size, len(val))
    return TrainingData(make_loader, train.name, train.class_names, train.resolution, train.channels,
                        val.images[:n], val.labels[:n], notes)


def synthetic_data(resolution: int, channels: int, num_classes: int, num_images: int, global_batch_size: int,
                   seed: int, device) -> TrainingData:
    """Random images and labels held like a named dataset: what a throughput benchmark trains on, so
    that it times the trainer's own step (loader included) without reading files."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, resolution, resolution, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_images).astype(np.int64)
    names = [str(k) for k in range(num_classes)]
    train = ImageSet("synthetic", images, labels, names)

    def make_loader(rank, world_size, accumulation):
        return InMemoryLoader(train, global_batch_size, seed, device, False, rank, world_size, accumulation)

    return TrainingData(make_loader, "synthetic", names, resolution, channels, images[:64], labels[:64],
                        ["random images (a benchmark's)"])


def _holdout(num_samples: int, fraction: float, val_batch_size: int, global_batch_size: int,
             name: str) -> tuple[np.ndarray, list[str]]:
    """The validation samples of a folder or shard set and the line that says which they are: `fraction`
    of the set (at least 1, at most `val_batch_size`) never trained on, or, for 0, training samples."""
    if not fraction:
        held = order.held_out(num_samples, min(val_batch_size, num_samples))
        return held, [f"validation: {len(held)} training images (in-sample, data.holdout=0)"]
    count = min(val_batch_size, max(1, round(fraction * num_samples)))
    if num_samples - count < global_batch_size:
        raise SourceError(f"'{name}' has {num_samples} images: holding {count} out for validation leaves fewer "
                          f"than one global batch of {global_batch_size}; lower --train.global_batch_size or "
                          f"--data.holdout")
    return order.held_out(num_samples, count), [
        f"validation: {count} of {num_samples} images held out (data.holdout={fraction:g}), never trained on"]


def _from_shards(cfg, global_batch_size, val_batch_size, seed, device) -> TrainingData:
    from genfoundry.shards import ShardDataset, ShardError

    dataset = ShardDataset(cfg.source)
    name = Path(str(cfg.source).rstrip("/")).name
    problems = dataset.verify(checksums=False)  # missing or cut shards: an error now, not in some rank's batch
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardError(f"{problems[0]}{more}; pack '{name}' again or copy its missing files")
    channels, content_notes = _channels_of(dataset, cfg.channels)
    resolution, notes = shard_resolution(dataset, cfg.resolution)
    notes = content_notes + notes
    held, held_note = _holdout(len(dataset), cfg.holdout, val_batch_size, global_batch_size, name)
    notes += held_note
    class_names = dataset.class_names or [""]

    train = shard_pipeline(resolution, channels, cfg.fast_jpeg, cfg.hflip)
    train.add_transform(Normalize([0.5] * channels, [0.5] * channels))

    def make_loader(rank, world_size, accumulation):
        return train.loader(dataset, global_batch_size, device, seed, cfg.workers, rank, world_size,
                            accumulation=accumulation, exclude=held if cfg.holdout else None)

    failed = []
    val = list(decoded_samples(dataset, held, shard_pipeline(resolution, channels, cfg.fast_jpeg), failed))
    if failed:
        notes.append(f"{len(failed)} validation image(s) failed to decode and are left out, e.g. {failed[0]}")
    if not val:
        raise SourceError(f"none of the {len(held)} validation images of '{name}' could be decoded")
    val_images = np.stack([image for image, _ in val])
    val_labels = np.asarray([y for _, y in val], dtype=np.int64)
    return TrainingData(make_loader, name, class_names, resolution, channels, val_images, val_labels, notes)


def shard_resolution(dataset, resolution: int = 0) -> tuple[int, list[str]]:
    """The side a shard set trains at, and a note when it was chosen for the user: `resolution` if
    given; else the side the set was packed at; else `sources.default_side` of its image sizes, as for
    a folder."""
    if resolution:
        return resolution, []
    packed = dataset.options.get("resolution")
    if packed:
        return int(packed), []
    sizes = content_summary(dataset)["image_sizes"]
    side, note = default_side(sizes["distinct"], tuple(sizes["most_common"][:2]))
    return side, [note] if note else []


SIZE_SCAN = 1000  # headers read, spread over the set, when index.json has no counts (packed before format 2)


def content_summary(dataset) -> dict:
    """index.json's "image_sizes", "channels" and "num_unlabelled" (shard format 2); for an older set,
    the same counted from the headers and labels of up to SIZE_SCAN samples spread over it (all of a
    smaller set; no pixels are decoded), with "scanned" saying how many. Worked out once per dataset."""
    if "channels" in dataset.index and "image_sizes" in dataset.index:
        return dataset.index
    if getattr(dataset, "_content_summary", None) is None:
        from collections import Counter

        from genfoundry.data.decode import DecodeError, image_channels, image_size

        sizes, channels, unlabelled = Counter(), {1: 0, 3: 0}, 0
        chosen = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), SIZE_SCAN)).astype(np.int64))
        for i in chosen:
            data, meta = dataset.read(int(i))
            unlabelled += meta.get("label") is None
            try:
                sizes[image_size(data)] += 1
                channels[image_channels(data)] += 1
            except DecodeError:
                continue  # the loader substitutes it, and counts and names it, when it comes up
        if not sizes:
            raise SourceError(f"no image of '{dataset.url}' has a readable header")
        (width, height), count = sizes.most_common(1)[0]
        dataset._content_summary = {"image_sizes": {"distinct": len(sizes), "most_common": [width, height, count]},
                                    "channels": channels, "num_unlabelled": unlabelled, "scanned": len(chosen)}
    return dataset._content_summary


def _channels_of(dataset, requested: int = 0) -> tuple[int, list[str]]:
    """The channels a shard set trains with (`requested`, else the set's majority) and the notes on what
    that converts and which samples have no label (`content_summary`)."""
    from genfoundry.sources import choose_channels

    summary, notes = content_summary(dataset), []
    counts = {int(c): n for c, n in summary["channels"].items()}
    unlabelled, total = summary["num_unlabelled"], len(dataset)
    if "scanned" in summary:
        total = summary["scanned"]
        notes.append(f"counted channels and labels from the headers of {total} of {len(dataset)} samples "
                     f"(packed before shard format 2; pack again for exact counts and no scan)")
    channels, note = choose_channels(counts, requested)
    notes += [note] if note else []
    if unlabelled == total:
        notes.append("no sample has a label: all train only the unconditional (null) class; pack the images "
                     "again to make them one class")
    elif unlabelled:
        notes.append(f"{unlabelled} of {total} samples have no class (files at the top of a folder with "
                     f"class folders, or list rows without a label): they train only the unconditional (null) class")
    return channels, notes


def decoded_samples(dataset, indices, pipeline: DataPipeline, failed: list[str]) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 [H, W, C] image, label or -1) of chosen samples of a shard set, in order, through
    `pipeline` (which must draw nothing at random); 'key: reason' of each sample that fails to decode
    is appended to `failed` and the sample left out. Shard and I/O errors are raised."""
    from genfoundry.data.decode import DecodeError

    rng = np.random.default_rng(0)
    for index in indices:
        data, meta = dataset.read(int(index))
        try:
            image = pipeline.prepare(data, rng)[0]
        except DecodeError as e:
            failed.append(f"{meta.get('key', index)}: {e}")
            continue
        yield image, -1 if meta.get("label") is None else int(meta["label"])


def shard_pipeline(resolution: int, channels: int, fast_jpeg: bool = False, hflip: bool = False) -> DataPipeline:
    """How shard samples become training images: the short side resized to `resolution`, the centre
    square cropped (a no-op for images already at that size), optional random flips. Training, the
    validation batch and FID references all decode through it."""
    p = DataPipeline(channels, fast_jpeg).add_transform(Resize(resolution)).add_transform(CenterCrop(resolution))
    return p.add_transform(RandomHorizontalFlip()) if hflip else p
