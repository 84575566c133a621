"""Metrics through one call: `report(name, value)` from anywhere, flushed per interval to sinks."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

FORMAT_VERSION = 1

_sums: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)


def report(name: str, value) -> None:
    """Adds a value to the running mean of `name` for the current interval."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item()
    _sums[name] += float(value)
    _counts[name] += 1


def collect() -> dict[str, float]:
    """Means since the last collect, averaged across ranks when torch.distributed is running."""
    names = sorted(_sums)
    means = {n: _sums[n] / _counts[n] for n in names}
    _sums.clear()
    _counts.clear()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and names:
        values = torch.tensor([means[n] for n in names], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        means = dict(zip(names, (values / torch.distributed.get_world_size()).tolist()))
    return means


class JsonlSink:
    """Appends one JSON object per interval to metrics.jsonl."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, step: int, values: dict) -> None:
        row = {"format_version": FORMAT_VERSION, "step": step, "time": time.time()}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ConsoleSink:
    """One status line per interval: step, loss, images/s, ETA."""

    def __init__(self, total_steps: int, print_fn=print):
        self.total_steps = total_steps
        self.print = print_fn

    def write(self, step: int, values: dict) -> None:
        parts = [f"step {step:>6}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"),
                         ("images_per_s", ".0f"), ("mfu", ".1%"), ("comm/compression_ratio", ".1f")):
            if values.get(key) is not None:
                parts.append(f"{key} {values[key]:{fmt}}")
        if values.get("eta_s") is not None:
            m, s = divmod(int(values["eta_s"]), 60)
            parts.append(f"eta {m}m{s:02d}s")
        self.print("  ".join(parts), flush=True)
