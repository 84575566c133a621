"""What FID reference statistics are made of, and their images, built the way training builds its images.

A `Reference` names everything that shapes the statistics: the content of the source (not its name or
path), the resolution and channels the run trains at, the resize convention that brings images to 299 px,
and the hash of the network file. Two references with the same key may share cached statistics; any
difference in one of these gives another key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genfoundry.features import check_resize, network_sha256
from genfoundry.sources import SOURCES, SourceError


@dataclass(frozen=True)
class Reference:
    source: str          # as the user named it: shown, but not part of the key (content is)
    kind: str            # "dataset" | "folder" | "shards"
    split: str           # split of a named dataset; "" for folders and shard sets (they have none)
    content: str         # what the images are: name:split, or a hash of the files or shard checksums
    resolution: int      # image side in pixels before the resize to 299
    channels: int        # 1 or 3
    resize: str          # genfoundry.features.RESIZES key
    network_sha256: str  # SHA-256 of the feature network file
    max_images: int = 0  # the first N images only (0: all)

    def identity(self) -> dict:
        """The fields that shape the statistics: equal identities give equal statistics."""
        fields = dataclasses.asdict(self)
        del fields["source"]
        return fields

    @property
    def key(self) -> str:
        return _digest(self.identity())

    @property
    def label(self) -> str:
        return f"{self.source}:{self.split}" if self.kind == "dataset" else self.source

    @property
    def file_stem(self) -> str:
        """A readable file name: the dataset and split, or the folder or shard set's name and image shape."""
        name = Path(self.source.rstrip("/")).name or self.source
        stem = f"{name}-{self.split}" if self.kind == "dataset" else f"{name}-{self.shape}"
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)

    @property
    def shape(self) -> str:
        return f"{self.resolution}x{self.resolution}x{self.channels}"

    def describe(self, num_images: int, num_left_out: int) -> dict:
        """The reference's identity as the result JSON records it."""
        return {"source": self.source, "kind": self.kind, "split": self.split, "resolution": self.resolution,
                "channels": self.channels, "num_images": num_images, "num_left_out": num_left_out,
                "max_images": self.max_images, "resize": self.resize, "network_sha256": self.network_sha256[:12],
                "key": self.key[:16]}


def resolve(source: str, split: str, resolution: int, channels: int, resize: str, max_images: int = 0) -> Reference:
    """The reference `source` names, checked and fingerprinted in well under a second (no image decoded)."""
    from genfoundry.data.build import is_shard_set

    check_resize(resize)
    if is_shard_set(source):
        from genfoundry.shards import ShardDataset

        dataset = ShardDataset(source)
        kind, split, content = "shards", "", _digest([[s["sha256"], s["num_samples"]] for s in dataset.shards])
    elif source in SOURCES:
        kind, content = "dataset", f"{source}:{split}"
    elif Path(source).expanduser().is_dir():
        kind, split, content = "folder", "", _folder_digest(Path(source))
    else:
        raise SourceError(f"reference '{source}' is neither a dataset ({', '.join(sorted(SOURCES))}), an image "
                          f"folder nor a packed shard set; choose another with --reference or eval.reference")
    return Reference(source, kind, split, content, resolution, channels, resize, network_sha256(), max_images)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _folder_digest(root: Path) -> str:
    """The files `load_folder` reads (as `list_folder` lists them), by relative path, size and
    modification time: any edit changes it, a copy with its times kept does not."""
    from genfoundry.sources import list_folder

    try:
        listing = list_folder(root)
    except SourceError as e:
        raise SourceError(f"{e}; choose another reference with --reference or eval.reference") from None
    entries = []
    for path, _ in listing.files:
        stat = path.stat()
        entries.append((path.relative_to(listing.root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return _digest(entries)


@dataclass
class ReferenceImages:
    """uint8 batches [B, H, W, C] of a reference at its resolution and channels, and what was left out."""

    num_images: int
    left_out: list[str]           # 'name: reason' of each image that could not be decoded
    batches: Iterator[np.ndarray]


def images(ref: Reference, batch_size: int) -> ReferenceImages:
    """The reference's images as training makes them: a named dataset as it is, a folder through
    `load_folder`, a shard set through the training decode pipeline (streamed: it may not fit in memory)."""
    if ref.kind == "shards":
        return _shard_images(ref, batch_size)
    if ref.kind == "dataset":
        from genfoundry.sources import load_images

        loaded, left_out = load_images(ref.source, ref.split).images, []
        if loaded.shape[1:] != (ref.resolution, ref.resolution, ref.channels):
            shape = "x".join(map(str, loaded.shape[1:]))
            raise SourceError(f"reference '{ref.source}' holds {shape} images but the run makes {ref.shape} ones; "
                              f"choose a folder or shard set of the run's images with --reference")
    else:
        from genfoundry.sources import load_folder

        folder = load_folder(ref.source, ref.resolution, ref.channels)
        loaded, left_out = folder.images, [f"{path}: {why}" for path, why in folder.skipped.items()]
    loaded = loaded[:ref.max_images or None]
    return ReferenceImages(len(loaded), left_out,
                           (loaded[i:i + batch_size] for i in range(0, len(loaded), batch_size)))


def _shard_images(ref: Reference, batch_size: int) -> ReferenceImages:
    from genfoundry.data.build import decoded_samples, shard_pipeline
    from genfoundry.shards import ShardDataset

    dataset = ShardDataset(ref.source)
    pipeline = shard_pipeline(ref.resolution, ref.channels)  # no flips: it draws nothing at random
    count = min(len(dataset), ref.max_images or len(dataset))
    result = ReferenceImages(count, [], iter(()))

    def batches() -> Iterator[np.ndarray]:
        batch = []
        for image, _ in decoded_samples(dataset, range(count), pipeline, result.left_out):
            batch.append(image)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    result.batches = batches()
    return result
