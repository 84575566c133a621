"""Decoding fused with the size transforms: one decode (at reduced DCT scale where it pays), one resample.

JPEG goes through libjpeg-turbo via simplejpeg; other formats through Pillow. simplejpeg cannot decode
only a region, so the crop is taken from the (possibly down-scaled) full decode.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes JPEG too, with draft-mode DCT scaling
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8"


class DecodeError(ValueError):
    """An image that cannot be decoded; the batch substitutes it and the loader counts it."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    try:
        if simplejpeg is not None and data[:2] == JPEG_MAGIC:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return w, h
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # decoders raise a variety of types for broken headers
        raise DecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None


def reduction(box_size: tuple[float, float], out_size: tuple[int, int]) -> float:
    """How many times smaller the output is than the region it comes from (the smaller axis)."""
    return min(box_size[0] / out_size[0], box_size[1] / out_size[1])


def decode(data: bytes, box: tuple[float, float, float, float], out_size: tuple[int, int],
           channels: int = 3) -> np.ndarray:
    """The region `box` (pixels of the full image) of an encoded image, resampled to `out_size` (w, h),
    as uint8 [h, w, channels]."""
    mode = "RGB" if channels == 3 else "L"
    width, height = image_size(data)
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    # Decode at a reduced DCT scale only when the target is at least 2x smaller than its region:
    # the crop is then still at least as large as the output, so nothing is upsampled.
    shrink = reduction((box_w, box_h), out_size) >= 2
    try:
        if simplejpeg is not None and data[:2] == JPEG_MAGIC:
            kwargs = {}
            if shrink:
                kwargs = {"min_width": math.ceil(width * out_size[0] / box_w),
                          "min_height": math.ceil(height * out_size[1] / box_h)}
            array = simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY", **kwargs)
            image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
        else:
            image = Image.open(io.BytesIO(data))
            if shrink and image.format == "JPEG":
                image.draft(mode, (math.ceil(width * out_size[0] / box_w), math.ceil(height * out_size[1] / box_h)))
            image = image.convert(mode)
    except Exception as e:  # corrupt data surfaces as many exception types
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    sx, sy = image.width / width, image.height / height
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if image.size == out_size and scaled == (0, 0, image.width, image.height):
        out = image
    else:
        out = image.resize(out_size, Image.Resampling.BILINEAR, box=scaled)
    return np.asarray(out, dtype=np.uint8).reshape(out_size[1], out_size[0], channels)
