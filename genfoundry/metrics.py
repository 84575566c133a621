"""Metrics through one call: `report(name, value)` from anywhere, flushed per interval to sinks."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
import zlib

import torch

from genfoundry import accel

FORMAT_VERSION = 1

# name -> running sum (a device tensor where the values were tensors, so nothing waits for the device)
_sums: dict[str, torch.Tensor | float] = {}
_counts: dict[str, int] = defaultdict(int)


def report(name: str, value) -> None:
    """Adds a value to the running mean of `name` for the current interval.

    A tensor stays on its device and is added there: reporting never waits for the accelerator. The
    values are read once per interval, in `collect`.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean()
    else:
        value = float(value)
    _sums[name] = _sums[name] + value if name in _sums else value
    _counts[name] += 1


def collect() -> dict[str, float]:
    """Means since the last collect; in a process group, over every value any rank reported.

    One all-reduce of the sums and counts on the device the communication backend takes (after a
    two-number check that all ranks report the same names; where they do not, the names are
    gathered first). Every rank must call it at the same point.
    """
    names = sorted(_sums)
    sums, counts = dict(_sums), dict(_counts)
    _sums.clear()
    _counts.clear()
    if accel.distributed():
        names = _agreed_names(names)
        device = accel.comm_device()
    else:
        device = next((v.device for v in sums.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if not names:
        return {}
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums_vector = torch.stack([sums[n].to(device, dtype) if isinstance(sums.get(n), torch.Tensor) else
                               torch.tensor(float(sums.get(n, 0.0)), dtype=dtype, device=device)
                               for n in names])
    count_vector = torch.tensor([float(counts.get(n, 0)) for n in names], dtype=dtype, device=device)
    totals = accel.all_reduce(torch.cat([sums_vector, count_vector])).tolist()  # the one host sync
    k = len(names)
    return {n: totals[i] / totals[k + i] if totals[k + i] else math.nan for i, n in enumerate(names)}


def _agreed_names(names: list[str]) -> list[str]:
    """The names every rank reports: this rank's when all agree (checked by a checksum), else their union."""
    check = zlib.crc32("\0".join(names).encode())
    seen = accel.all_reduce(torch.tensor([check, -check], dtype=torch.float64, device=accel.comm_device()), "max")
    if seen[0].item() == -seen[1].item():  # max == min: the same names everywhere
        return names
    gathered = [None] * accel.world_size()
    torch.distributed.all_gather_object(gathered, names)
    return sorted(set().union(*gathered))


class JsonlSink:
    """Appends one JSON object per interval to metrics.jsonl, and one per event (a resume)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, step: int, values: dict) -> None:
        self._append({"format_version": FORMAT_VERSION, "step": step, "time": time.time(), **values})

    def event(self, name: str, step: int, values: dict) -> None:
        """A row that marks something the run did rather than measured, e.g. {"event": "resume", ...}."""
        self._append({"format_version": FORMAT_VERSION, "event": name, "step": step, "time": time.time(), **values})

    def _append(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path, all_rows: bool = False) -> list[dict]:
    """The metric rows of the run as it went on, in step order; `all_rows` gives every row as written.

    A resumed run starts again from its checkpoint, so the file repeats the steps after it. A resume
    row at step k drops the rows after k written before it (the abandoned attempt, whatever steps it
    logged), and of rows for the same step the newest is kept. Event rows are left out."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if all_rows:
        return rows
    by_step: dict[int, dict] = {}
    for row in rows:
        if row.get("event") == "resume":
            by_step = {s: r for s, r in by_step.items() if s <= row["step"]}
        elif "event" not in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


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
