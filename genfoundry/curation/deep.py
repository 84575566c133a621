"""Stages 2 and 3 on a slice: decode each survivor once on CPU workers, then batch every model on the
accelerator: the semantic filters' scores and embeddings, and TF-Inception features for the quality stage.

Only scores are stored, never decisions: thresholds are applied afterwards (`decide`), so changing one
and running again redoes no model work.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from genfoundry.curation.filters import ImageFilter, square
from genfoundry.curation.inputs import Item
from genfoundry.sources import as_8bit, failure_reason, read_input

INCEPTION_SIDE = 299


@dataclass
class Job:
    """What the decode workers need: the filters (without their models) and whether TF-Inception runs."""

    filters: list[ImageFilter]
    inception: bool

    @property
    def square_side(self) -> int:
        """The side of the centre square sent once per image: TF-Inception's 299 px when it runs (its
        protocol resizes on the CPU, bicubic), else the largest side a square filter wants."""
        sides = [f.side for f in self.filters if f.square]
        return INCEPTION_SIDE if self.inception else max(sides, default=0)


def upright(data: bytes):
    """An input's bytes as the upright 8-bit RGB image every stage sees (stage 1 made sure it decodes)."""
    from PIL import Image

    from genfoundry.curation.basic import own_pixel_limit

    with own_pixel_limit():
        image = Image.open(io.BytesIO(data))
        image.load()
    return as_8bit(image, channels=3)


def decode_chunk(args: tuple[list[Item], Job]) -> list[dict | str]:
    """Each item's model inputs by view name, or the reason it could not be read this time."""
    items, job = args
    out = []
    for item in items:
        try:
            image = upright(read_input(item.source, item.at))
        except FileNotFoundError:
            out.append("vanished")
            continue
        except Exception as e:  # the file changed since stage 1: recorded, the others go on
            out.append(f"decode-error: {failure_reason(e)}")
            continue
        views = {f.name: f.prepare(image) for f in job.filters if not f.square}
        if job.square_side:
            views["square"] = square(image, job.square_side, "bicubic")
        out.append(views)
    return out


def resize_square(images, side: int):
    """uint8 [N, S, S, 3] on the device -> uint8 [N, side, side, 3], bilinear with antialiasing (as
    Pillow filters when it shrinks), so square filters see the same pixels on every device."""
    import torch
    import torch.nn.functional as F

    if images.shape[1] == side:
        return images
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(side, side), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@contextlib.contextmanager
def tuned_convolutions():
    import torch

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class Models:
    """The loaded models of one process: the filters, and TF-Inception on `device`."""

    def __init__(self, filters: list[ImageFilter], inception: bool, device: str):
        self.filters = filters
        self.net = None
        if inception:
            from genfoundry.features import InceptionFeatures

            self.net = InceptionFeatures(device)
        self.device = device

    def run(self, views: list[dict], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """One batch: `score_<name>` [N] per filter, `embed_<name>` [N, D] where a filter embeds, and
        `features` [N, 2048] (float32) for the quality stage.

        On an accelerator cuDNN's autotuner picks each convolution's fastest algorithm (the default
        heuristics run EfficientNet-Lite0 and TF-Inception 2-3x slower on an H200), so every batch is
        given one shape: a short last batch is padded to `batch_size` with copies of its last image,
        whose results are dropped."""
        n = len(views)
        if batch_size and n < batch_size and not str(self.device).startswith("cpu"):
            views = views + [views[-1]] * (batch_size - n)
        with tuned_convolutions():
            out = self._run(views)
        return {key: value[:n] for key, value in out.items()}

    def _run(self, views: list[dict]) -> dict[str, np.ndarray]:
        import torch

        out = {}
        shared = None
        if "square" in views[0]:
            shared = torch.from_numpy(np.stack([v["square"] for v in views])).to(self.device)
        for f in self.filters:
            batch = resize_square(shared, f.side) if f.square else np.stack([v[f.name] for v in views])
            result = f.score(batch)
            if f.embeds:
                result, embeddings = result
                out[f"embed_{f.name}"] = np.asarray(embeddings, np.float16)
            out[f"score_{f.name}"] = np.asarray(result, np.float32)
        if self.net is not None:
            x = (shared.permute(0, 3, 1, 2).float() - 128.0) / 128.0  # the network's input range
            out["features"] = self.net.forward(x).astype(np.float32)
        return out


def score_slice(items: list[Item], job: Job, models: Models, pool, batch_size: int, progress=None) -> dict:
    """Scores and features of `items`, in order; rows that failed to decode have their reason in
    'failures' (index -> reason) and NaN scores."""
    chunk = 8
    chunks = [(items[i:i + chunk], job) for i in range(0, len(items), chunk)]
    results = pool.imap(decode_chunk, chunks) if pool is not None else map(decode_chunk, chunks)
    parts: dict[str, list[np.ndarray]] = {}
    order: list[int] = []
    failures: dict[int, str] = {}
    pending: list[dict] = []
    pending_at: list[int] = []

    def flush():
        for key, value in models.run(pending, batch_size).items():
            parts.setdefault(key, []).append(value)
        order.extend(pending_at)
        if progress:
            progress(len(pending))
        pending.clear()
        pending_at.clear()

    index = 0
    for decoded in results:
        for views in decoded:
            if isinstance(views, str):
                failures[index] = views
                if progress:
                    progress(1)
            else:
                pending.append(views)
                pending_at.append(index)
                if len(pending) == batch_size:
                    flush()
            index += 1
    if pending:
        flush()
    out = {"failures": failures}
    for key, values in parts.items():
        stacked = np.concatenate(values)
        full = np.full((len(items), *stacked.shape[1:]), np.nan, dtype=stacked.dtype)
        full[order] = stacked
        out[key] = full
    return out
