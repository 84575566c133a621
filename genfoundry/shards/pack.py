"""Pack images into WebDataset-layout tar shards with per-shard offsets and a checksummed index.

A shard is complete when its sidecar `shard-NNNNNN.json` exists (written last, atomically), so a pack
interrupted at any point is resumed by running it again: complete shards are not redone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from genfoundry.shards.index import FORMAT_VERSION, ShardError, shard_name, write_json_atomic
from genfoundry.sources import IMAGE_SUFFIXES, SOURCES, load_images

FORMATS = {"keep", "jpeg", "png"}


@dataclass
class Item:
    """One input: where it comes from and what we know of it before decoding."""

    source: str               # a file path, or 'dataset:split:index'
    label: int | None = None
    class_name: str | None = None
    caption: str | None = None


def list_inputs(src: str) -> tuple[list[Item], list[str]]:
    """Inputs in a deterministic order, and the class names."""
    name, _, split = src.partition(":")
    if name in SOURCES:
        images = load_images(name, split or "train")
        return ([Item(f"{name}:{split or 'train'}:{i}", int(y), images.class_names[y])
                 for i, y in enumerate(images.labels)], images.class_names)
    path = Path(src)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ShardError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{src}'")
        classes = sorted({p.relative_to(path).parts[0] for p in files if len(p.relative_to(path).parts) > 1})
        items = []
        for p in files:
            parts = p.relative_to(path).parts
            cls = parts[0] if len(parts) > 1 else None
            items.append(Item(str(p), classes.index(cls) if cls else None, cls))
        return items, classes
    if path.suffix.lower() in (".csv", ".parquet") and path.is_file():
        return _list_file(path)
    raise ShardError(f"'{src}' is not an image folder, a .csv/.parquet list or one of {sorted(SOURCES)}")


def _list_file(path: Path) -> tuple[list[Item], list[str]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = set(rows[0]) if rows else set()
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        rows, columns = table.to_pylist(), set(table.column_names)
    if "path" not in columns:
        raise ShardError(f"'{path}' has no 'path' column (columns: {sorted(columns)})")
    labels = [r.get("label") for r in rows]
    named = sorted({str(x) for x in labels if x not in (None, "") and not str(x).lstrip("-").isdigit()})
    items = []
    for r, label in zip(rows, labels):
        if label in (None, ""):
            idx, cls = None, None
        elif str(label).lstrip("-").isdigit():
            idx, cls = int(label), None
        else:
            idx, cls = named.index(str(label)), str(label)
        items.append(Item(str((path.parent / r["path"]).resolve()), idx, cls, r.get("caption") or None))
    return items, named


def _encode(item: Item, resolution: int | None, image_format: str, quality: int, dataset_cache: dict):
    """(bytes, extension, original size) of one input; raises on an input that does not decode."""
    from PIL import Image

    if item.source.count(":") == 2 and item.source.split(":")[0] in SOURCES:
        name, split, index = item.source.split(":")
        if (name, split) not in dataset_cache:
            dataset_cache[(name, split)] = load_images(name, split).images
        array = dataset_cache[(name, split)][int(index)]
        image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        original, data, ext = image.size, None, "png"
    else:
        with open(item.source, "rb") as f:
            data = f.read()
        image = Image.open(io.BytesIO(data))
        image.load()  # decode fully: a truncated or corrupt file fails here, not in training
        original = image.size
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format, (image.format or "img").lower())
    if resolution is None and image_format == "keep" and data is not None:
        return data, ext, original
    if resolution is not None:
        from genfoundry.sources import center_crop_resize

        image = center_crop_resize(image.convert("L" if image.mode in ("L", "1") else "RGB"), resolution)
    fmt = image_format if image_format != "keep" else ("png" if max(image.size) <= 64 or ext == "png" else "jpeg")
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB" if image.mode != "L" else "L").save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "PNG")
    return buf.getvalue(), "jpg" if fmt == "jpeg" else "png", original


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Appends a member; returns where its data starts in the file and its size."""
    start = tar.offset + tarfile.BLOCKSIZE  # a USTAR header with a short name is one block
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return start, len(data)


def write_shard(task) -> dict:
    """Writes one shard (temporary name, then rename) and its sidecar; returns the sidecar."""
    out, number, first, items, resolution, image_format, quality = task
    out = Path(out)
    name = shard_name(number)
    tmp = out / f".{name}.tar.tmp{os.getpid()}"
    offsets, failures, cache = [], [], {}
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, item in enumerate(items):
            key = f"{first + k:09d}"
            try:
                data, ext, original = _encode(item, resolution, image_format, quality, cache)
            except Exception as e:  # any decoder error: record it, leave the input out, go on
                failures.append({"source": item.source, "reason": f"{type(e).__name__}: {e}"})
                continue
            meta = {"key": key, "label": item.label, "class_name": item.class_name, "caption": item.caption,
                    "original_size": list(original), "source": item.source}
            image_at = _add(tar, f"{key}.{ext}", data)
            json_at = _add(tar, f"{key}.json", json.dumps(meta).encode())
            offsets.append((*image_at, *json_at))
    tar_path = out / f"{name}.tar"
    os.replace(tmp, tar_path)
    np.save(out / f"{name}.offsets.npy", np.asarray(offsets, dtype=np.int64).reshape(-1, 4))
    digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    sidecar = {"format_version": FORMAT_VERSION, "name": f"{name}.tar", "num_samples": len(offsets),
               "bytes": tar_path.stat().st_size, "sha256": digest, "first_input": first, "failures": failures}
    write_json_atomic(out / f"{name}.json", sidecar)
    return sidecar


def pack(src: str, out: str, samples_per_shard: int = 1000, resolution: int | None = None,
         image_format: str = "keep", quality: int = 90, workers: int = 0, progress: bool = True) -> dict:
    """Packs `src` (folder, .csv/.parquet list, 'mnist[:split]', 'fashion-mnist[:split]') into `out`."""
    if image_format not in FORMATS:
        raise ShardError(f"image format must be one of {sorted(FORMATS)}, got '{image_format}'")
    if samples_per_shard < 1:
        raise ShardError(f"samples per shard must be at least 1, got {samples_per_shard}")
    items, class_names = list_inputs(src)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    options = {"source": src, "samples_per_shard": samples_per_shard, "resolution": resolution,
               "image_format": image_format, "quality": quality}
    tasks, done = [], {}
    for number, first in enumerate(range(0, len(items), samples_per_shard)):
        sidecar = outdir / f"{shard_name(number)}.json"
        tar = outdir / f"{shard_name(number)}.tar"
        if sidecar.is_file() and tar.is_file():
            meta = json.loads(sidecar.read_text())
            if meta["bytes"] == tar.stat().st_size:
                done[number] = meta
                continue
        tasks.append((str(outdir), number, first, items[first:first + samples_per_shard], resolution,
                      image_format, quality))
    workers = workers or os.cpu_count() or 1
    results = dict(done)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks) + len(done), initial=len(done), unit="shard", desc=f"pack {src}")
    if workers == 1 or len(tasks) <= 1:
        mapped = map(write_shard, tasks)
    else:
        pool = get_context("spawn").Pool(min(workers, len(tasks)))
        mapped = pool.imap_unordered(write_shard, tasks)
    for sidecar in mapped:
        results[int(sidecar["name"][6:12])] = sidecar
        if bar:
            bar.update()
    if bar:
        bar.close()
    if workers > 1 and len(tasks) > 1:
        pool.close()
        pool.join()
    shards, failures, start = [], [], 0
    for number in sorted(results):
        s = results[number]
        shards.append({k: s[k] for k in ("name", "num_samples", "bytes", "sha256")} | {"first_sample": start})
        start += s["num_samples"]
        failures += s["failures"]
    with open(outdir / "failures.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in failures)
    index = {"format_version": FORMAT_VERSION, "num_samples": start, "num_inputs": len(items),
             "num_failures": len(failures), "class_names": class_names, "options": options, "shards": shards}
    write_json_atomic(outdir / "index.json", index)
    return index
