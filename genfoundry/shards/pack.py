"""Pack images into WebDataset-layout tar shards with per-shard offsets and a checksummed index.

Shard n holds inputs n*S .. n*S+S-1 of the sorted input list (S = samples_per_shard), so every shard
can be written independently, in parallel, and redone alone. A shard is complete when its index file
exists, matches the tar's size and was made from the same inputs and options; running the same pack
again therefore redoes only what is missing or stale.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from genfoundry.shards.index import (FAILURES_NAME, FORMAT_VERSION, INDEX_NAME, SHARD_FILE, TAR_BLOCK, TAR_RECORD,
                                     TEMP_FILE, ShardError, encode_json, idx_name, read_shard_index, sample_key,
                                     sha256_bytes, sha256_file, tar_name, ustar_header)
from genfoundry.checkpoint.storage import atomic_writer, write_atomic
from genfoundry.errors import writable_directory
from genfoundry.sources import (SOURCES, SourceError, as_8bit, center_crop_resize, channels_of, failure_reason,
                                ignored_note, list_folder, load_images, orientation, read_input, read_table)

FORMATS = ("keep", "jpeg", "png")
SMALL_SIDE = 64  # at or below this side, JPEG artefacts are a large share of the signal: store PNG
# Extensions WebDataset decoders recognise, by the format PIL detects (not the file's suffix, which lies).
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
               "TIFF": "tiff"}
_LOSSY = {"JPEG", "MPO"}
_JPEG_MODES = ("L", "RGB")  # what simplejpeg and nvJPEG decode as Pillow does (not CMYK)


@dataclass(frozen=True)
class Input:
    """One input before decoding: where it comes from and what the listing says about it."""

    source: str               # an absolute file path, or 'dataset:split:index'
    label: int | None = None
    class_name: str | None = None
    caption: str | None = None
    scores: tuple[tuple[str, float], ...] = ()  # a curated list's score columns, carried into the shards


# Columns of a list that are scores (genfoundry curate's kept.parquet): they travel into the shards.
SCORE_COLUMNS = re.compile(r"^(score_\w+|mahalanobis|pixel_std)$")


@dataclass
class Inputs:
    items: list[Input]
    class_names: list[str]
    arrays: np.ndarray | None = None  # uint8 [N, H, W, C] pixels when the source is a dataset
    left_out: list[dict] = field(default_factory=list)  # {"source", "reason"} of entries the listing skipped
    ignored: dict[str, int] = field(default_factory=dict)  # suffix -> files of a folder not read as images


@dataclass
class _Task:
    out: str
    number: int
    first: int
    items: list[Input]
    arrays: np.ndarray | None
    encoding: dict
    recipe: str


def list_inputs(src: str) -> Inputs:
    """The inputs of `src` in the order they are packed, and the class names."""
    name, _, split = str(src).partition(":")
    if name in SOURCES:
        split = split or "train"
        try:
            images = load_images(name, split)
        except SourceError as e:
            raise ShardError(str(e)) from None
        items = [Input(f"{name}:{split}:{i}", int(y), images.class_names[int(y)])
                 for i, y in enumerate(images.labels)]
        return Inputs(items, list(images.class_names), images.images)
    path = Path(os.path.expanduser(src))
    if path.is_dir():
        try:
            listing = list_folder(path)
        except SourceError as e:
            raise ShardError(str(e)) from None
        items = [Input(str(p), label, None if label is None else listing.class_names[label])
                 for p, label in listing.files]
        left_out = [{"source": source, "reason": reason} for source, reason in listing.left_out.items()]
        return Inputs(items, listing.class_names, left_out=left_out, ignored=listing.ignored)
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
        return _list_file(path)
    if path.is_file():
        raise ShardError(f"'{src}' is a file but not a .csv or .parquet list of images")
    raise ShardError(f"source '{src}' does not exist: give an image folder, a .csv/.parquet list with a 'path' "
                     f"column, or one of {', '.join(f'{s}[:split]' for s in sorted(SOURCES))}")


def _as_int(value) -> int | None:
    """An integer label written as 3, 3.0 or "3"; None for a class name."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def _list_file(path: Path) -> Inputs:
    try:
        rows, columns = read_table(path)
    except SourceError as e:
        raise ShardError(str(e)) from None
    if not rows:
        raise ShardError(f"'{path}' lists no images")
    base = Path(os.path.abspath(path.parent))
    score_columns = [c for c in columns if SCORE_COLUMNS.match(c)]
    # Missing labels are None; NaN comes from pandas writing a column with gaps.
    raw = [r.get("label") for r in rows]
    raw = [None if v is None or v == "" or (isinstance(v, float) and v != v) else v for v in raw]
    given = [v for v in raw if v is not None]
    ints = [_as_int(v) for v in given]
    if not given:  # a list without labels is one class named after it, as a folder without class folders
        class_names = [path.stem]
    elif all(i is not None for i in ints):
        class_names = [str(i) for i in range(max(ints) + 1)]
    elif any(i is not None for i in ints):
        raise ShardError(f"the 'label' column of '{path}' mixes integers and class names; use one or the other")
    else:
        class_names = sorted({str(v) for v in given})
    items = []
    for row, value in zip(rows, raw):
        if not given:
            label = 0
        else:
            label = None if value is None else (_as_int(value) if _as_int(value) is not None
                                                else class_names.index(str(value)))
        caption = row.get("caption")
        caption = None if caption is None or caption == "" or caption != caption else str(caption)
        # A name that is not UTF-8 is in source_bytes exactly (kept.parquet); 'path' shows it escaped.
        raw = row.get("source_bytes")
        file = Path(os.fsdecode(raw) if raw else str(row["path"] or ""))
        scores = tuple((c, float(row[c])) for c in score_columns
                       if isinstance(row.get(c), (int, float)) and row[c] == row[c])
        items.append(Input(os.path.normpath(file if file.is_absolute() else base / file), label,
                           None if label is None else class_names[label], caption, scores))
    return Inputs(items, class_names)


def _raw_mode(image) -> str:
    """How the file lays out its samples (e.g. 'I;16B', 'RGB;16B'), known before the pixels are decoded."""
    args = image.tile[0][3] if image.tile else ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _reencode_reason(image, kind: str | None) -> str | None:
    """Why `keep` cannot store an opened file's bytes as they are, or None.

    Every reader must decode the stored bytes alike and without extra work: simplejpeg and nvJPEG
    ignore EXIF orientation and decode only grayscale and YCbCr JPEGs, and scaling 16-bit or float
    samples down on every read is wasted work. Read from the header, before a decode empties `tile`."""
    reasons = []
    raw = _raw_mode(image)
    if image.mode.startswith("I;16") or (";16" in raw and raw.split(";")[0] == image.mode):
        reasons.append("16-bit")
    elif image.mode in ("I", "F"):
        reasons.append("32-bit integer" if image.mode == "I" else "float")
    if (o := orientation(image)) != 1:
        reasons.append(f"EXIF orientation {o}")
    if kind in _LOSSY and image.mode not in _JPEG_MODES:
        reasons.append(f"{image.mode} JPEG")
    return "; ".join(reasons) or None


def encode(item: Input, array: np.ndarray | None, resolution: int | None, image_format: str,
           quality: int) -> tuple[bytes, str, tuple[int, int], dict]:
    """(bytes, extension, original (w, h), facts) of one input; raises if the input does not decode.

    `facts` are the stored image's "channels" (1 or 3) and "size" ([w, h]), and "reencoded": why a
    `keep` input was stored as lossless PNG rather than as its own bytes (None when it was not)."""
    from PIL import Image

    reason = None
    if array is not None:
        image, data, kind = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array), None, "PNG"
    else:
        data = read_input(item.source)
        image = Image.open(io.BytesIO(data))
        kind = image.format
        reason = _reencode_reason(image, kind)
        image.load()  # a full decode, so that a truncated file fails here rather than in training
    original = image.size
    keep = data is not None and resolution is None and image_format == "keep"
    if keep and reason is None:
        ext = _EXTENSIONS.get(kind) or Path(item.source).suffix.lower().lstrip(".") or "img"
        return data, ext, original, {"channels": channels_of(image), "size": list(original), "reencoded": None}
    # The one conversion every reader uses: EXIF orientation applied (re-encoding drops EXIF), 16-bit scaled.
    image = as_8bit(image)
    if resolution is not None:
        # The same crop and filter as sources.load_folder: shards and in-memory folders give equal pixels.
        image = center_crop_resize(image, resolution)
    facts = {"channels": 1 if image.mode == "L" else 3, "size": list(image.size), "reencoded": reason if keep else None}
    fmt = image_format
    if fmt == "keep":
        fmt = "jpeg" if kind in _LOSSY and max(image.size) > SMALL_SIDE and not keep else "png"
    if fmt == "jpeg":
        import simplejpeg

        pixels = np.asarray(image)
        gray = pixels.ndim == 2
        data = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels[..., None] if gray else pixels), quality=quality,
                                      colorspace="GRAY" if gray else "RGB", colorsubsampling="444")
        return data, "jpg", original, facts
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue(), "png", original, facts


class _TarWriter:
    """Appends members to an uncompressed tar, knowing where each member's data starts."""

    def __init__(self, f):
        self.f, self.offset = f, 0

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Writes a member; returns the offset of its data in the file, and its size."""
        start = self.offset + TAR_BLOCK
        pad = -len(data) % TAR_BLOCK
        self.f.write(ustar_header(name, len(data)))
        self.f.write(data)
        self.f.write(b"\0" * pad)
        self.offset = start + len(data) + pad
        return start, len(data)

    def finish(self) -> None:
        end = self.offset + 2 * TAR_BLOCK  # two zero blocks mark the end of the archive
        self.f.write(b"\0" * (2 * TAR_BLOCK + (-end % TAR_RECORD)))


def write_shard(task: _Task) -> dict:
    """Writes one shard's tar, then its index file (both atomically); returns the shard's record."""
    out = Path(task.out)
    tar_path, idx_path = out / tar_name(task.number), out / idx_name(task.number)
    keys, offsets, failures = [], [], []
    channels, sizes, reencoded, unlabelled = Counter(), Counter(), Counter(), 0
    scores: dict[str, dict[str, float]] = {}
    with atomic_writer(tar_path) as f:
        tar = _TarWriter(f)
        for k, item in enumerate(task.items):
            key = sample_key(task.first + k)
            try:
                data, ext, original, facts = encode(item, None if task.arrays is None else task.arrays[k],
                                                    **task.encoding)
            except Exception as e:  # any decoder error (a decompression bomb too): record it, leave it out, go on
                failures.append({"source": item.source, "reason": failure_reason(e)})
                continue
            meta = {"key": key, "label": item.label, "class_name": item.class_name, "caption": item.caption,
                    "original_size": list(original), "source": item.source, "channels": facts["channels"]}
            if item.scores:
                meta["scores"] = dict(item.scores)
            if facts["reencoded"]:
                meta["reencoded"] = facts["reencoded"]
                reencoded[facts["reencoded"]] += 1
            channels[str(facts["channels"])] += 1
            sizes[tuple(facts["size"])] += 1
            unlabelled += item.label is None
            image_at = tar.add(f"{key}.{ext}", data)
            meta_at = tar.add(f"{key}.json", encode_json(meta))
            keys.append(key)
            offsets.append([*image_at, *meta_at])
            for name, value in item.scores:
                scores.setdefault(name, {})[key] = value
        tar.finish()
    idx = {"format_version": FORMAT_VERSION, "name": tar_path.name, "bytes": tar_path.stat().st_size,
           "sha256": sha256_file(tar_path), "recipe": task.recipe, "first_input": task.first,
           "num_inputs": len(task.items), "num_samples": len(keys), "keys": keys, "offsets": offsets,
           "failures": failures, "channels": {c: channels[c] for c in ("1", "3")},
           "sizes": [[w, h, n] for (w, h), n in sorted(sizes.items())], "reencoded": dict(sorted(reencoded.items())),
           "num_unlabelled": unlabelled}
    if scores:  # curation's scores per sample (None where a sample has none), in key order
        idx["scores"] = {name: [values.get(k) for k in keys] for name, values in sorted(scores.items())}
    data = encode_json(idx)
    write_atomic(idx_path, data)
    return _record(task.number, idx, data)


def _record(number: int, idx: dict, idx_bytes: bytes) -> dict:
    return {"number": number, "name": idx["name"], "index": idx_name(number), "num_inputs": idx["num_inputs"],
            "num_samples": idx["num_samples"], "bytes": idx["bytes"], "sha256": idx["sha256"],
            "index_sha256": sha256_bytes(idx_bytes), "failures": idx["failures"],
            **{k: idx[k] for k in ("channels", "sizes", "reencoded", "num_unlabelled")}}


def _finished(out: Path, number: int, recipe: str) -> dict | None:
    """The record of a shard a previous run completed from the same inputs and options, else None."""
    tar_path, idx_path = out / tar_name(number), out / idx_name(number)
    if not (tar_path.is_file() and idx_path.is_file()):
        return None
    data = idx_path.read_bytes()
    try:
        idx = read_shard_index(data, idx_path.name)
    except ShardError:
        return None
    if (idx.get("format_version") != FORMAT_VERSION or idx.get("recipe") != recipe
            or idx.get("bytes") != tar_path.stat().st_size):
        return None
    return _record(number, idx, data)


def _run(tasks: list[_Task], workers: int):
    if min(workers, len(tasks)) <= 1:
        yield from map(write_shard, tasks)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a forked child would inherit locked.
    with get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(write_shard, tasks)


def _tidy(out: Path, num_shards: int, rewriting: bool) -> None:
    """Removes temporary files of interrupted runs and shards beyond the new count.

    index.json goes first when shards will change: its presence means that the set is complete.
    """
    extra = [p for p in out.iterdir() if (m := SHARD_FILE.match(p.name)) and int(m.group(1)) >= num_shards]
    if rewriting or extra:
        (out / INDEX_NAME).unlink(missing_ok=True)
    for p in extra + [p for p in out.iterdir() if TEMP_FILE.match(p.name)]:
        p.unlink(missing_ok=True)


def pack(src: str, out: str, samples_per_shard: int = 1000, resolution: int | None = None,
         image_format: str = "keep", quality: int = 90, workers: int = 0, progress: bool = True) -> dict:
    """Packs `src` into shards under `out`; returns the dataset index (also written to out/index.json).

    `src`: an image folder, a .csv/.parquet list with a 'path' column (and optional 'label', 'caption'),
    or 'mnist[:split]' / 'fashion-mnist[:split]'. With resolution=None and image_format='keep' the
    original bytes are stored, except where readers would decode them differently or at extra cost
    (16-bit, EXIF-rotated, CMYK JPEG): those are stored as lossless PNG and counted. Otherwise images
    are re-encoded (centre-cropped and resized when `resolution` is given) as 'jpeg' (at `quality`) or
    lossless 'png'. Inputs left out are rows of failures.jsonl, with the reason.
    """
    if image_format not in FORMATS:
        raise ShardError(f"image format must be one of {', '.join(FORMATS)}, got '{image_format}'")
    for what, value, low in (("samples per shard", samples_per_shard, 1), ("workers", workers, 0),
                             ("resolution", 1 if resolution is None else resolution, 1)):
        if not isinstance(value, int) or value < low:
            raise ShardError(f"{what} must be an integer of at least {low}, got {value!r}")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ShardError(f"JPEG quality must be an integer from 1 to 100, got {quality!r}")
    inputs = list_inputs(src)
    outdir = writable_directory(out, ShardError)
    encoding = {"resolution": resolution, "image_format": image_format, "quality": quality}
    num_shards = -(-len(inputs.items) // samples_per_shard)

    records, tasks = {}, []
    for number in range(num_shards):
        first = number * samples_per_shard
        items = inputs.items[first:first + samples_per_shard]
        recipe = sha256_bytes(encode_json({"encoding": encoding, "first": first,
                                           "inputs": [[i.source, i.label, i.class_name, i.caption, *i.scores]
                                                      for i in items]}))
        done = _finished(outdir, number, recipe)
        if done:
            records[number] = done
        else:
            arrays = None if inputs.arrays is None else inputs.arrays[first:first + samples_per_shard]
            tasks.append(_Task(str(outdir), number, first, items, arrays, encoding, recipe))
    _tidy(outdir, num_shards, rewriting=bool(tasks))

    from genfoundry.progress import bar as progress_bar

    failed = len(inputs.left_out) + sum(len(r["failures"]) for r in records.values())
    with progress_bar(len(inputs.items), f"pack {Path(str(src)).name or src}",
                      initial=sum(r["num_inputs"] for r in records.values()), enabled=progress) as bar:
        for record in _run(tasks, workers or os.cpu_count() or 1):
            records[record["number"]] = record
            failed += len(record["failures"])
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(record["num_inputs"])

    shards, failures, start = [], list(inputs.left_out), 0
    channels, sizes, reencoded, unlabelled = Counter(), Counter(), Counter(), 0
    for number in range(num_shards):
        r = records[number]
        shards.append({"name": r["name"], "index": r["index"], "num_samples": r["num_samples"], "bytes": r["bytes"],
                       "sha256": r["sha256"], "index_sha256": r["index_sha256"], "first_sample": start})
        start += r["num_samples"]
        failures += r["failures"]
        channels.update(r["channels"])
        sizes.update({(w, h): n for w, h, n in r["sizes"]})
        reencoded.update(r["reencoded"])
        unlabelled += r["num_unlabelled"]
    num_inputs = len(inputs.items) + len(inputs.left_out)
    write_atomic(outdir / FAILURES_NAME, "".join(json.dumps(f) + "\n" for f in failures).encode())
    if start == 0:
        raise ShardError(f"none of the {num_inputs} inputs of '{src}' could be decoded; "
                         f"the reasons are in {outdir / FAILURES_NAME}")
    (width, height), count = min(sizes.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: the smaller size
    index = {"format_version": FORMAT_VERSION, "num_samples": start, "num_inputs": num_inputs,
             "num_failures": len(failures), "ignored_files": inputs.ignored, "num_reencoded": sum(reencoded.values()),
             "reencoded": dict(sorted(reencoded.items())), "num_unlabelled": unlabelled,
             "channels": {c: channels[c] for c in ("1", "3")},
             "image_sizes": {"distinct": len(sizes), "most_common": [width, height, count]},
             "class_names": inputs.class_names,
             "options": {"source": str(src), "samples_per_shard": samples_per_shard, **encoding},
             "shards": shards}
    write_atomic(outdir / INDEX_NAME, json.dumps(index, indent=1).encode())
    return index


def summary(index: dict, out: str) -> str:
    """The line `genfoundry pack` prints: what was packed, and how much was left out, re-encoded or unlabelled."""
    parts = [f"packed {index['num_samples']} of {index['num_inputs']} inputs into {len(index['shards'])} shards in "
             f"{out}", f"{index['num_failures']} left out (reasons in {FAILURES_NAME})"]
    if index["num_reencoded"]:
        why = ", ".join(f"{n} {reason}" for reason, n in index["reencoded"].items())
        parts.append(f"{index['num_reencoded']} stored as lossless PNG instead of their own bytes ({why})")
    gray, colour = index["channels"]["1"], index["channels"]["3"]
    if gray and colour:
        parts.append(f"{gray} grayscale and {colour} colour images")
    if index["num_unlabelled"]:
        parts.append(f"{index['num_unlabelled']} without a class: they train only the unconditional (null) class")
    if index.get("ignored_files"):
        parts.append(ignored_note(index["ignored_files"], Path(index["options"]["source"]).name))
    return "; ".join(parts)
