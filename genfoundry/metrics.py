"""Metrics through one call: `report(name, value)` from anywhere, collected per interval, written to sinks
(metrics.jsonl, TensorBoard event files, the console line)."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
import zlib

import torch

from genfoundry import accel
from genfoundry import rundir

FORMAT_VERSION = 1
# The readers live with the run-directory contract (no torch there); here too, where the writers are.
read_jsonl, kept_rows, MetricsError = rundir.read_jsonl, rundir.kept_rows, rundir.MetricsError


# name -> running sum (a device tensor where the values were tensors, so nothing waits for the device)
_sums: dict[str, torch.Tensor | float] = {}
_counts: dict[str, int] = defaultdict(int)
_spread: set[str] = set()  # names whose per-rank means are also reduced to a minimum and a maximum


def report(name: str, value, spread: bool = False) -> None:
    """Adds a value to the running mean of `name` for the current interval.

    A tensor stays on its device and is added there: reporting never waits for the accelerator. The
    values are read once per interval, in `collect`. With `spread`, the interval also gets
    `name.min` and `name.max` (in a process group): the lowest and highest of the ranks' own means,
    which is how a straggler shows (one rank waiting on data far longer than the others).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean()
    else:
        value = float(value)
    _sums[name] = _sums[name] + value if name in _sums else value
    _counts[name] += 1
    if spread:
        _spread.add(name)


def collect() -> dict[str, float]:
    """Means since the last collect; in a process group, over every value any rank reported.

    One all-reduce of the sums and counts on the device the communication backend takes (after a
    two-number check that all ranks report the same names; where they do not, the names are
    gathered first). Every rank must call it at the same point.
    """
    names = sorted(_sums)
    sums, counts, spread = dict(_sums), dict(_counts), set(_spread)
    _sums.clear()
    _counts.clear()
    _spread.clear()
    if accel.distributed():
        names = _agreed_names(names + [f"{n}\0spread" for n in sorted(spread)])
        spread = {n[:-7] for n in names if n.endswith("\0spread")}
        names = [n for n in names if not n.endswith("\0spread")]
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
    totals = torch.cat([sums_vector, count_vector])
    spread = [n for n in names if n in spread] if accel.distributed() else []  # alone, min = max = mean
    if spread:  # this rank's means; the maximum of (mean, -mean) over ranks gives both extremes
        at = [names.index(n) for n in spread]
        mine = sums_vector[at] / count_vector[at]  # NaN where this rank reported nothing: max skips it
        extremes = torch.cat([mine, -mine])
        extremes = torch.where(torch.isnan(extremes), torch.full_like(extremes, -math.inf), extremes)
        extremes = accel.all_reduce(extremes, "max").tolist()
    totals = accel.all_reduce(totals).tolist()  # with `extremes`, the interval's only host syncs
    k = len(names)
    out = {n: totals[i] / totals[k + i] if totals[k + i] else math.nan for i, n in enumerate(names)}
    for j, n in enumerate(spread):
        out[f"{n}.min"], out[f"{n}.max"] = -extremes[len(spread) + j], extremes[j]
    return out


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
        self._cut_torn_line()

    def _cut_torn_line(self) -> None:
        """A last line without its newline was cut short by a crash: it is removed, or the next row
        would be glued to it and both lost (the reader leaves out only a torn last line)."""
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, 2)
                if not size:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                f.seek(max(size - 2**20, 0))
                tail = f.read()
                if b"\n" in tail:
                    f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
                elif size <= len(tail):  # the whole file is one torn line
                    f.truncate(0)
        except FileNotFoundError:
            pass

    def write(self, step: int, values: dict, wall_time: float | None = None) -> None:
        self._append({"format_version": FORMAT_VERSION, "step": step, "time": wall_time or time.time(), **values})

    def event(self, name: str, step: int, values: dict, wall_time: float | None = None) -> None:
        """A row that marks something the run did rather than measured: {"event": "resume" | "rollback" |
        "checkpoint" | "eval", ...}."""
        self._append({"format_version": FORMAT_VERSION, "event": name, "step": step,
                      "time": wall_time or time.time(), **values})

    def _append(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class TensorBoardSink:
    """TensorBoard event files in the run directory, beside metrics.jsonl, so that `tensorboard --logdir
    runs/` shows every run: the scalars of each interval, events as scalars, sample grids as images,
    the resolved config as text. The `tensorboard` package is imported here only, when a run asks."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        # purge_step: a resumed run (from step k, purge_step k + 1) hides the abandoned attempt's later events
        self.writer = SummaryWriter(str(log_dir), flush_secs=10, purge_step=purge_step)  # its thread flushes: a live run lags <= 10 s

    def write(self, step: int, values: dict, wall_time: float | None = None) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(name, value, step, walltime=wall_time)

    def event(self, name: str, step: int, values: dict, wall_time: float | None = None) -> None:
        self.write(step, {f"{name}/{k}": v for k, v in values.items()} or {f"{name}/at": 1.0}, wall_time)

    def image(self, tag: str, step: int, image_hwc) -> None:
        """A uint8 HWC image (a sample grid)."""
        self.writer.add_image(tag, image_hwc, step, dataformats="HWC")
        self.writer.flush()

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def close(self) -> None:
        self.writer.close()


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
