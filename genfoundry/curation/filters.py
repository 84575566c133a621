"""Semantic filters: pretrained models that score images, each with a threshold, in one registry.

A filter is two halves. Its input is made on the CPU decode workers: by default (`square`) the centre
square of the image, which every such filter and TF-Inception share, sent once per image and resized
to the filter's `side` on the device; a filter that needs another fit (padded, stretched) sets
`square = False` and writes `prepare`, which runs on one upright RGB PIL image in the workers. `score`
runs in the main process on a batch of those inputs (uint8 [N, side, side, 3]: a torch tensor on the
device for square filters, a numpy array from `prepare` otherwise), on the accelerator where the model
can use one. An image is dropped, with the filter's
`reason`, when its score is above the threshold (`drop_above`) or below it.

A user's own model (a local CLIP checkpoint, say) plugs in the same way: `curate.filters =
["ocr", "mypackage.filters:make_filter"]`, where the factory takes keyword options (`device`,
`threshold`, ...) and returns an `ImageFilter`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from genfoundry.errors import ConfigError, GenfoundryError


class MissingPackage(GenfoundryError):
    """An optional package a filter needs is not installed; the message says what to install."""


def require(module: str, install: str, why: str):
    """`module` imported, or one line saying what to install for `why`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{why} needs the '{module}' package: {install}") from None


def square(image, side: int, resample: str = "bilinear") -> np.ndarray:
    """The centre square of an upright RGB PIL image, resized to side x side, as uint8 [side, side, 3]."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    method = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[resample]
    return np.asarray(image.resize((side, side), method, box=(left, top, left + s, top + s)))


class ImageFilter:
    """Base of every semantic filter; subclasses set the class attributes and override `score`."""

    name: str = ""          # the registry name; the manifest's score column is `score_<name>`
    reason: str = ""        # the machine-readable drop reason, e.g. "text-heavy"
    threshold: float = 0.5  # default threshold; the config may set another
    drop_above: bool = True  # drop when score > threshold (else when score < threshold)
    side: int = 224         # the side of the model's input
    square: bool = True     # the input is the shared centre square resized to `side` (else `prepare`)
    embeds: bool = False    # True when `score` also returns embeddings for semantic dedup

    def __init__(self, device: str = "cpu", threshold: float | None = None):
        self.device = device
        if threshold is not None:
            self.threshold = float(threshold)

    def __getstate__(self) -> dict:
        # Filters travel to the decode workers for `prepare`; loaded models (attributes named with a
        # leading underscore) stay behind.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def prepare(self, image) -> np.ndarray:
        """CPU worker side, for filters that are not `square`: one upright RGB PIL image -> the model's
        input array."""
        return square(image, self.side)

    def score(self, batch) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Main-process side: a batch of inputs -> float scores [N] (and embeddings [N, D] when
        `embeds`)."""
        raise NotImplementedError

    def drops(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.threshold if self.drop_above else scores < self.threshold

    def message(self, score: float) -> str:
        """The human message of a drop."""
        side = "above" if self.drop_above else "below"
        return f"{self.name} score {score:.3g} is {side} the threshold {self.threshold:g}"


@dataclass(frozen=True)
class FilterSpec:
    factory: Callable[..., ImageFilter]
    summary: str  # one line for --help and the docs


FILTERS: dict[str, FilterSpec] = {}


def register(name: str, summary: str):
    def wrap(factory):
        FILTERS[name] = FilterSpec(factory, summary)
        return factory
    return wrap


def build(name: str, device: str = "cpu", threshold: float | None = None) -> ImageFilter:
    """The filter registered as `name`, or the one a 'module:factory' name makes."""
    _load_builtin()
    if name in FILTERS:
        return FILTERS[name].factory(device=device, threshold=threshold)
    if ":" not in name:
        raise ConfigError(f"unknown semantic filter '{name}'; use one of {', '.join(sorted(FILTERS))} "
                          f"or 'module:factory' for your own")
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load the semantic filter '{name}': {e}") from None
    made = factory(device=device, threshold=threshold)
    if not isinstance(made, ImageFilter):
        raise ConfigError(f"'{name}' returned {type(made).__name__}, not a genfoundry.curation.filters.ImageFilter")
    return made


def builtin_help() -> str:
    """One line per registered filter, for --help."""
    _load_builtin()
    lines = []
    for name, spec in sorted(FILTERS.items()):
        cls = spec.factory if isinstance(spec.factory, type) else None
        default = (f" (drops '{cls.reason}' {'above' if cls.drop_above else 'below'} {cls.threshold:g})"
                   if cls else "")
        lines.append(f"  {name:<10} {spec.summary}{default}")
    return "\n".join(lines)


def _load_builtin() -> None:
    # The built-in filters register themselves on import; their heavy packages import only when built.
    from . import models  # noqa: F401 (registers on import)


@register("blank", "near-uniform images (grey-level standard deviation below the threshold, in 0..1)")
class BlankFilter(ImageFilter):
    """Blank, near-uniform images; no model, so it runs everywhere."""

    name, reason, threshold, drop_above, side = "blank", "blank", 0.02, False, 64

    def score(self, batch) -> np.ndarray:
        import torch

        rgb = torch.as_tensor(batch).float()
        grey = rgb @ torch.tensor([0.299, 0.587, 0.114], device=rgb.device)  # ITU-R 601 luma, as Pillow's "L"
        return (grey.flatten(1).std(1, correction=0) / 255.0).cpu().numpy()
