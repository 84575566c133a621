"""Stage 1: what each file is (header read before any pixel), rules on it, a full decode, and dedup.

`examine` never raises for a bad input: whatever the file is (empty, truncated, not an image, a
decompression bomb, gone since it was listed) it returns a row with a reason. The pixel limit is checked
from the header, so a bomb is never decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings

import numpy as np

from genfoundry.curation.config import BasicConfig
from genfoundry.curation.inputs import Item
from genfoundry.sources import as_8bit, failure_reason, oriented_size, orientation, read_input

HASH_SIDE = 64  # the decoded image is reduced to about this side before the perceptual hash


@contextlib.contextmanager
def own_pixel_limit():
    """Pillow's decompression-bomb check off: basic.max_pixels, checked from the header, replaces it."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def drop(row: dict, reason: str, message: str) -> dict:
    row.update(decision="drop", reason=reason, message=message)
    return row


def _has_alpha(image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def _high_bit_depth(image) -> bool:
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def colour_rules(image, frames: int, rules: BasicConfig) -> tuple[list[str], tuple[str, str] | None]:
    """(the conversions the rules allow, (reason, message) of the first one they reject, or None)."""
    found = []
    if image.mode == "CMYK":
        found.append(("cmyk", "CMYK"))
    if _high_bit_depth(image):
        found.append(("high_bit_depth", f"{image.mode} samples"))
    if _has_alpha(image):
        found.append(("alpha", "transparency" if image.mode == "P" else f"alpha channel ({image.mode})"))
    if frames > 1:
        found.append(("animated", f"{frames} frames"))
    if (o := orientation(image)) != 1:
        found.append(("exif_rotation", f"EXIF orientation {o}"))
    converted = []
    for key, what in found:
        if getattr(rules, key) == "reject":
            return converted, (key.replace("_", "-"), f"{what}; basic.{key}=reject")
        converted.append(key.replace("_", "-"))
    return converted, None


def examine(item: Item, rules: BasicConfig) -> dict:
    """The stage-1 row of one input: facts, scores and a keep or drop decision with its reason."""
    from PIL import Image

    row = {"bytes": None, "sha256": None, "format": None, "width": None, "height": None, "mode": None,
           "frames": None, "converted": None, "phash": None, "pixel_std": None,
           "stage": "basic", "decision": "keep", "reason": None, "message": None}
    try:
        data = read_input(item.source, item.at)
    except FileNotFoundError as e:
        return drop(row, "vanished", f"gone since it was listed: {e.strerror or e}")
    except OSError as e:
        return drop(row, "unreadable", f"{type(e).__name__}: {e.strerror or e}")
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        return drop(row, "empty", "a zero-byte file")
    try:
        with own_pixel_limit():
            image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        return drop(row, "not-an-image", "the content is not an image format Pillow reads")
    except Exception as e:  # any decoder error on the header: the file is recorded and curation goes on
        return drop(row, "corrupt-header", failure_reason(e))
    with image:
        try:
            frames = int(getattr(image, "n_frames", 1))
            width, height = oriented_size(image)
        except Exception as e:  # a header whose frames or EXIF block cannot be read
            return drop(row, "corrupt-header", failure_reason(e))
        row.update(format=image.format, width=width, height=height, mode=image.mode, frames=frames)
        if image.format not in rules.format_set:
            return drop(row, "format", f"{image.format} is not among basic.formats ({rules.formats})")
        if width * height > rules.max_pixels:
            return drop(row, "too-many-pixels", f"{width}x{height} is more than basic.max_pixels "
                                                f"({rules.max_pixels}): a possible decompression bomb, not decoded")
        if len(data) < rules.min_bytes:
            return drop(row, "small-file", f"{len(data)} bytes, below basic.min_bytes ({rules.min_bytes})")
        if min(width, height) < rules.min_side:
            return drop(row, "small", f"{width}x{height}: the shorter side is below basic.min_side ({rules.min_side})")
        if max(width, height) / min(width, height) > rules.max_aspect:
            return drop(row, "aspect-ratio", f"{width}x{height}: more than basic.max_aspect ({rules.max_aspect:g}) "
                                             f"to 1")
        converted, rejected = colour_rules(image, frames, rules)
        if rejected:
            return drop(row, *rejected)
        try:
            with own_pixel_limit():
                image.load()  # the full decode: a truncated or corrupt file fails here, not in training
            upright = as_8bit(image, channels=3)
        except Exception as e:  # any decoder error: recorded with its reason
            reason = "truncated" if "truncated" in str(e) else "decode-error"
            return drop(row, reason, failure_reason(e))
    row["converted"] = ",".join(converted) or None
    hash_image = upright.convert("L")
    factor = max(1, min(hash_image.size) // HASH_SIDE)
    if factor > 1:
        hash_image = hash_image.reduce(factor)
    import imagehash

    row["phash"] = str(imagehash.phash(hash_image))
    row["pixel_std"] = float(np.asarray(hash_image, dtype=np.float32).std() / 255.0)
    return row


def exact_duplicates(rows: list[dict]) -> int:
    """Drops kept rows whose bytes equal an earlier kept row's; returns how many."""
    first: dict[str, str] = {}
    dropped = 0
    for row in rows:
        if row["decision"] != "keep":
            continue
        original = first.setdefault(row["sha256"], row["source"])
        if original != row["source"]:
            drop(row, "exact-duplicate", f"the same bytes as {original}")
            row["duplicate_of"] = original
            dropped += 1
    return dropped


def near_duplicates(rows: list[dict], bits: int) -> int:
    """Drops kept rows whose 64-bit perceptual hash is within `bits` (Hamming) of an earlier kept row's.

    Exact, not approximate: the hash is split into bits + 1 bands, and two hashes within `bits` of each
    other agree on at least one whole band (pigeonhole), so only rows sharing a band are compared."""
    if bits < 0:
        return 0
    bands = bits + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    masks = [((1 << int(hi - lo)) - 1) << int(lo) for lo, hi in zip(edges[:-1], edges[1:])]
    buckets: list[dict[int, list[int]]] = [{} for _ in masks]
    kept_hash: list[int] = []
    kept_source: list[str] = []
    dropped = 0
    for row in rows:
        if row["decision"] != "keep":
            continue
        h = int(row["phash"], 16)
        candidates = {j for band, mask in zip(buckets, masks) for j in band.get(h & mask, ())}
        near = sorted(j for j in candidates if (kept_hash[j] ^ h).bit_count() <= bits)
        if near:
            j = near[0]
            drop(row, "near-duplicate", f"perceptual hash within {(kept_hash[j] ^ h).bit_count()} bits of "
                                        f"{kept_source[j]}")
            row["duplicate_of"] = kept_source[j]
            dropped += 1
            continue
        for band, mask in zip(buckets, masks):
            band.setdefault(h & mask, []).append(len(kept_hash))
        kept_hash.append(h)
        kept_source.append(row["source"])
    return dropped
