"""Transforms in two kinds, by where they run.

Size transforms (RandomResizedCrop, Resize, CenterCrop, RandomCrop) run per sample in CPU workers.
A chain of them composes into one crop box in the original image and one output size, so decoding
and resampling happen once (and at reduced DCT scale when the target is at least 2x smaller).

Batch transforms (RandomHorizontalFlip, ColorJitter, Normalize, any callable) run on the whole
batch on the accelerator, with per-sample parameters drawn on the host from each sample's own
random stream, so results do not depend on batch size, worker count or world size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image it applies to


def _pair(size) -> tuple[int, int]:
    """(height, width) from an int or a (height, width) pair, as torchvision takes them."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class SizeTransform(ABC):
    """Maps an image of (width, height) to a crop box in it and an output (width, height)."""

    @abstractmethod
    def plan(self, width: int, height: int, rng: np.random.Generator) -> tuple[Box, tuple[int, int]]:
        """The crop box and output size for one image."""


@dataclass
class RandomResizedCrop(SizeTransform):
    """A random area fraction in `scale` and aspect ratio in `ratio` (log-uniform), resized to `size`."""

    size: int | tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def plan(self, width, height, rng):
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
                return (x0, y0, x0 + w, y0 + h), _pair(self.size)[::-1]
        # Fallback, as is customary: the central crop with the ratio clamped to the allowed range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        x0, y0 = (width - w) // 2, (height - h) // 2
        return (x0, y0, x0 + w, y0 + h), _pair(self.size)[::-1]


@dataclass
class Resize(SizeTransform):
    """An int resizes the shorter side to `size` keeping the aspect ratio; a pair sets (height, width)."""

    size: int | tuple[int, int]

    def plan(self, width, height, rng):
        if isinstance(self.size, int):
            s = self.size / min(width, height)
            out = (max(1, round(width * s)), max(1, round(height * s)))
        else:
            out = _pair(self.size)[::-1]
        return (0, 0, width, height), out


def _crop_size(transform, width: int, height: int) -> tuple[int, int]:
    """(w, h) of a fixed-size crop, checked against the image it is cut from."""
    h, w = _pair(transform.size)
    if w > width or h > height:
        raise ValueError(f"{type(transform).__name__} {h}x{w} is larger than the {height}x{width} image; resize first")
    return w, h


@dataclass
class CenterCrop(SizeTransform):
    size: int | tuple[int, int]

    def plan(self, width, height, rng):
        w, h = _crop_size(self, width, height)
        x0, y0 = (width - w) // 2, (height - h) // 2
        return (x0, y0, x0 + w, y0 + h), (w, h)


@dataclass
class RandomCrop(SizeTransform):
    size: int | tuple[int, int]

    def plan(self, width, height, rng):
        w, h = _crop_size(self, width, height)
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        return (x0, y0, x0 + w, y0 + h), (w, h)


def compose_plans(transforms: list[SizeTransform], width: int, height: int,
                  rng: np.random.Generator) -> tuple[Box, tuple[int, int]]:
    """One box in the original image and one output size equivalent to the whole chain."""
    box: Box = (0.0, 0.0, float(width), float(height))
    size = (width, height)
    for t in transforms:
        (x0, y0, x1, y1), out = t.plan(size[0], size[1], rng)
        sx, sy = (box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]
        box = (box[0] + x0 * sx, box[1] + y0 * sy, box[0] + x1 * sx, box[1] + y1 * sy)
        size = out
    return box, size


class BatchTransform(ABC):
    """Draws per-sample parameters on the host; applies them to a float NCHW batch on the device."""

    num_params = 0  # length of the list params() returns

    def params(self, rng: np.random.Generator) -> list[float]:
        return []

    @abstractmethod
    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The transformed batch; `params` is [B, len(self.params(...))] on the batch's device."""


@dataclass
class RandomHorizontalFlip(BatchTransform):
    p: float = 0.5
    num_params = 1

    def params(self, rng):
        return [float(rng.random() < self.p)]

    def apply(self, x, params):
        flip = params[:, 0].bool()
        if x.device.type != "cpu":
            # A select over the whole batch: indexing by a mask would wait for the device to count it.
            return torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        if flip.any():  # only the flipped samples are copied
            x[flip] = x[flip].flip(-1)
        return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


@dataclass
class ColorJitter(BatchTransform):
    """Brightness, contrast, saturation and hue factors drawn per sample, applied in that fixed order.

    Factors are uniform in [1 - v, 1 + v] (hue: a shift in [-v, v] turns of the colour wheel, applied
    as a rotation about the grey axis in YIQ space). Values are clamped to [0, 1] after each step.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    num_params = 4

    def __post_init__(self):
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ColorJitter hue must be in [0, 0.5], got {self.hue}")

    def params(self, rng):
        def factor(v):
            return float(rng.uniform(max(0.0, 1 - v), 1 + v)) if v else 1.0
        return [factor(self.brightness), factor(self.contrast), factor(self.saturation),
                float(rng.uniform(-self.hue, self.hue)) if self.hue else 0.0]

    def apply(self, x, params):
        b, c, s, h = (params[:, i].view(-1, 1, 1, 1).to(x.dtype) for i in range(4))
        if self.brightness:
            x = (x * b).clamp_(0, 1)
        if self.contrast:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * c + mean).clamp_(0, 1)
        if self.saturation and x.shape[1] == 3:
            g = _gray(x)
            x = ((x - g) * s + g).clamp_(0, 1)
        if self.hue and x.shape[1] == 3:
            x = _rotate_hue(x, h.view(-1) * 2 * math.pi).clamp_(0, 1)
        return x


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(angle), 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = to_rgb @ rot @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m, x)


@dataclass
class Normalize(BatchTransform):
    mean: list[float]
    std: list[float]

    def apply(self, x, params):
        mean = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        inv_std = 1.0 / torch.as_tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return x.sub_(mean).mul_(inv_std)


class Lambda(BatchTransform):
    """Any callable f(batch) -> batch, applied on the device at its place in the pipeline."""

    def __init__(self, fn):
        self.fn = fn

    def apply(self, x, params):
        return self.fn(x)

    def __repr__(self):
        return f"Lambda({getattr(self.fn, '__name__', self.fn)!r})"
