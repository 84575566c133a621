"""Decoding fused with the size transforms: one decode (at reduced DCT scale where it pays), one resample.

JPEG goes through libjpeg-turbo via simplejpeg; other formats through Pillow. simplejpeg cannot decode
only a region, so the crop is taken from the (possibly down-scaled) full decode.

`as_8bit` is the one place where a file's pixels become 8-bit L or RGB: the packer, in-memory folders
and the Pillow branch here all go through it, so a file gives the same pixels on every path. It lives
in genfoundry.sources, which the packer's worker processes import without torch (2.5 s and 200 MB
each), and is imported here.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from genfoundry.errors import GenfoundryError
from genfoundry.sources import as_8bit, channels_of, orientation

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes JPEG too, with draft-mode DCT scaling
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8"


class DecodeError(GenfoundryError):
    """An image that cannot be decoded; the batch substitutes it and the loader counts it."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as `decode` sees the image, from the header, without decoding the pixels.

    Pillow's path applies EXIF orientation (`as_8bit`), simplejpeg's does not, as nvJPEG does not: the
    packer stores only upright JPEGs, so both agree on packed data."""
    try:
        if simplejpeg is not None and data[:2] == JPEG_MAGIC:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return w, h
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)  # these turn the image a quarter
    except Exception as e:  # decoders raise a variety of types for broken headers
        raise DecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None


def image_channels(data: bytes) -> int:
    """1 or 3: the channels the image decodes to by itself, from its header."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return channels_of(im)
    except Exception as e:  # decoders raise a variety of types for broken headers
        raise DecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None


def reduction(box_size: tuple[float, float], out_size: tuple[int, int]) -> float:
    """How many times smaller the output is than the region it comes from (the smaller axis)."""
    return min(box_size[0] / out_size[0], box_size[1] / out_size[1])


def decode(data: bytes, box: tuple[float, float, float, float], out_size: tuple[int, int],
           channels: int = 3, fast_jpeg: bool = False) -> np.ndarray:
    """The region `box` (pixels of the full image) of an encoded image, resampled to `out_size` (w, h),
    as uint8 [h, w, channels].

    `fast_jpeg` asks libjpeg-turbo for its fast chroma upsampling (nearest instead of triangular): about
    40% less decode time, about 41 dB PSNR against the accurate decode (BENCHMARKS.md). Pillow, the
    fallback decoder, has no such switch."""
    mode = "RGB" if channels == 3 else "L"
    width, height = image_size(data)
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    # Decode at a reduced DCT scale only when the target is at least 2x smaller than its region:
    # the crop is then still at least as large as the output, so nothing is upsampled.
    shrink = reduction((box_w, box_h), out_size) >= 2
    try:
        if simplejpeg is not None and data[:2] == JPEG_MAGIC:
            kwargs = {"fastupsample": True} if fast_jpeg else {}
            if shrink:
                kwargs |= {"min_width": math.ceil(width * out_size[0] / box_w),
                           "min_height": math.ceil(height * out_size[1] / box_h)}
            array = simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY", **kwargs)
            scaled = _scale_box(box, array.shape[1] / width, array.shape[0] / height)
            if all(abs(v - round(v)) < 1e-6 for v in scaled):
                return _resample_whole_pixels(array, [round(v) for v in scaled], out_size)
            image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
        else:
            image = Image.open(io.BytesIO(data))
            if shrink and image.format == "JPEG":
                image.draft(mode, (math.ceil(width * out_size[0] / box_w), math.ceil(height * out_size[1] / box_h)))
            image = as_8bit(image, channels)
            image.load()  # the pixels, here: a truncated body must fail as this sample's DecodeError
    except Exception as e:  # corrupt data surfaces as many exception types
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    scaled = _scale_box(box, image.width / width, image.height / height)
    if image.size == out_size and scaled == (0, 0, image.width, image.height):
        out = image
    else:
        out = image.resize(out_size, Image.Resampling.BILINEAR, box=scaled)
    return np.asarray(out, dtype=np.uint8).reshape(out_size[1], out_size[0], channels)


def _scale_box(box, sx: float, sy: float) -> tuple[float, float, float, float]:
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _resample_whole_pixels(array: np.ndarray, box: list[int], out_size: tuple[int, int]) -> np.ndarray:
    """Crop by slicing and resize with torch's vectorised uint8 antialiased bilinear filter: the same
    triangle filter as Pillow's BILINEAR (within one grey level), about 3x faster here, and no copy of
    the decoded image."""
    x0, y0, x1, y1 = box
    crop = torch.from_numpy(array)[y0:y1, x0:x1].permute(2, 0, 1)[None]
    if crop.shape[2:] == (out_size[1], out_size[0]):
        return np.ascontiguousarray(array[y0:y1, x0:x1])
    out = F.interpolate(crop, size=(out_size[1], out_size[0]), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()
