"""The run report page against TensorBoard: time to a readable loss curve on the same synthetic runs.

For each N in --steps, a run directory gets what a training run leaves: `config.toml` (the demo
recipe resolved, with the batch, fp16 and intervals the rows describe) and one row per step 0..N-1
of the trainer's metrics (decaying loss with noise and spikes, gradient norm, learning rate,
throughput, memory, data wait, fp16 loss scale, checkpoint stalls every 500 steps, at the preemption
and at the end, validation every 100), written with the same values through `JsonlSink`
(metrics.jsonl) and `TensorBoardSink` (event files), wall times 0.1 s apart; plus a resume (after a
300 s gap) and a checkpoint event per checkpoint. Then, per run:

- genfoundry: `build_report([run])` (wall time), the page's bytes, and the page in headless Chromium
  (`open_page`): first contentful paint, charts drawn (the page's own performance mark), load wall
  time from navigation until the page reports ready;
- TensorBoard, the baseline: `tensorboard --logdir RUN` launched, and the time until its scalars
  endpoint answers the `loss` tag with the final step N-1 (a user sees the whole curve), the points it
  returned (TensorBoard samples 1000 by default), the event files' bytes.

Each timing is the median of --repeats; TensorBoard is started afresh each time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from genfoundry import config as config_lib
from genfoundry import metrics
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.errors import ConfigError, GenfoundryError, writable_directory

DEFAULT_STEPS = [1000, 10000, 100000]
WALL_START = 1.75e9              # epoch seconds of step 0 (2025-06-15)
STEP_WALL_S = 0.1                # wall time between rows
RESUME_GAP_S = 300.0             # downtime before the resume
# the demo recipe with what the synthetic rows describe: an fp16 run, logging every step
RUN_OVERRIDES = {"train.global_batch_size": 128, "train.lr": 1e-3, "train.warmup_steps": 100, "train.precision": "fp16",
                 "train.log_every": 1, "train.val_every": 100, "checkpoint.full_every": 500}
TB_TIMEOUT_S = 900.0             # a TensorBoard that has not shown the final step by then is reported as such
TB_POLL_S = 0.05


def checkpoint_steps(steps: int, every: int, resume_at: int) -> set[int]:
    """Where the run saves a full state: every `every` steps, when preempted, at the end."""
    return set(range(every, steps, every)) | {resume_at, steps - 1}


def synthetic_rows(tc: config_lib.TrainConfig, full_every: int, resume_at: int, seed: int = 0) -> list[dict]:
    """The values the trainer would report at each of `tc.steps` steps of an fp16 run, preempted once
    at `resume_at` (saved there, resumed from there)."""
    rng = np.random.default_rng(seed)
    steps, batch = tc.steps, tc.global_batch_size
    s = np.arange(steps, dtype=np.float64)
    tau = max(steps / 6, 50.0)
    spikes = np.zeros(steps, dtype=bool)
    spikes[rng.choice(np.arange(steps // 10, steps), size=min(5, max(1, steps // 200)), replace=False)] = True
    loss = 0.32 + 0.7 * np.exp(-s / tau) + 0.02 * rng.standard_normal(steps)
    loss = np.where(spikes, loss * rng.uniform(2.5, 6.0, steps), loss)
    grad_norm = (0.25 + 1.8 * np.exp(-s / tau)) * rng.lognormal(0.0, 0.15, steps)
    grad_norm = np.where(spikes, grad_norm * rng.uniform(8.0, 30.0, steps), grad_norm)
    images_per_s = 2400.0 * rng.lognormal(0.0, 0.03, steps)
    images_per_s[:3] *= (0.2, 0.6, 0.9)  # compile and warm-up
    wait = rng.beta(1.2, 60.0, steps)
    allocated = 7.9 + 0.02 * rng.standard_normal(steps)
    val = 0.33 + 0.68 * np.exp(-s / tau)
    saves = checkpoint_steps(steps, full_every, resume_at)
    rows, scale, since_growth = [], 2.0**16, 0
    for i in range(steps):
        overflow = bool(spikes[i])
        since_growth = 0 if overflow else since_growth + 1
        scale = scale / 2 if overflow else (scale * 2 if since_growth % 1000 == 0 and scale < 2.0**20 else scale)
        row = {
            "loss": float(loss[i]), "grad_norm": float(grad_norm[i]), "lr": tc.lr * min(1.0, (i + 1) / tc.warmup_steps),
            "images_per_s": float(images_per_s[i]), "mfu": float(images_per_s[i] * 5.1e-5),
            "eta_s": (steps - i) * batch / float(images_per_s[i]), "images_seen": i * batch,
            "memory_allocated_gb": float(allocated[i]), "memory_allocated_gb.min": float(allocated[i] - 0.05),
            "memory_allocated_gb.max": float(allocated[i] + 0.07), "peak_memory_gb": 11.2 + 0.3 * min(1.0, i / 50),
            "data/wait_fraction": float(wait[i]), "data/wait_fraction.min": float(wait[i] * 0.4),
            "data/wait_fraction.max": float(min(1.0, wait[i] * 2.2)),
            "loss_scale": scale, "skipped_steps": float(overflow), "comm/bytes_per_step": 1.31e8,
            "restarts": float(i > resume_at), "rollbacks": 0.0,
        }
        if i in saves:
            row["checkpoint/stall_s"] = float(0.04 + 0.01 * rng.random())
        if i % tc.val_every == 0:
            row["val_loss"] = float(val[i] + 0.004 * rng.standard_normal())
            row["val_loss_ema"] = float(val[min(steps - 1, i + int(tau / 20))] + 0.002 * rng.standard_normal())
        rows.append(row)
    return rows


def write_run(run: Path, steps: int) -> dict:
    """A run directory as the trainer leaves it, the rows through genfoundry's own sinks; their timings."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = config_lib.load("demo", {**RUN_OVERRIDES, "train.steps": steps})
    write_atomic(run / "config.toml", config_lib.dumps(cfg).encode())
    resume_at = int(steps * 0.6)
    rows = synthetic_rows(cfg.train, cfg.checkpoint.full_every, resume_at)
    jsonl, tensorboard = metrics.JsonlSink(run / "metrics.jsonl"), metrics.TensorBoardSink(run)
    tensorboard.text("config", "\n".join("    " + line for line in (run / "config.toml").read_text().splitlines()))
    rng = np.random.default_rng(1)
    timings = {"jsonl_s": 0.0, "tensorboard_s": 0.0}

    def both(method: str, *args, wall_time: float) -> None:
        for name, sink in (("jsonl_s", jsonl), ("tensorboard_s", tensorboard)):
            start = time.perf_counter()
            getattr(sink, method)(*args, wall_time=wall_time)
            timings[name] += time.perf_counter() - start

    for step, row in enumerate(rows):
        wall = WALL_START + step * STEP_WALL_S + (RESUME_GAP_S if step > resume_at else 0.0)
        both("write", step, row, wall_time=wall)
        if "checkpoint/stall_s" in row:
            both("event", "checkpoint", step, {"kind": "full", "step": step, "stall_s": row["checkpoint/stall_s"],
                                               "durable_s": float(1.2 + 0.4 * rng.random()), "failed": False},
                 wall_time=wall + 1.5)
        if step == resume_at:
            both("event", "resume", step, {"images_seen": step * cfg.train.global_batch_size, "world_size": 1,
                                           "precision": "fp16"}, wall_time=wall + RESUME_GAP_S)
    start = time.perf_counter()
    tensorboard.close()
    timings["tensorboard_s"] += time.perf_counter() - start
    return timings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    """The JSON a URL answers with, or None while TensorBoard is not serving it yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def tensorboard_binary() -> str:
    beside = Path(sys.executable).parent / "tensorboard"
    found = str(beside) if beside.exists() else shutil.which("tensorboard")
    if not found:
        raise GenfoundryError("tensorboard not found beside this Python nor on PATH: pip install 'tensorboard>=2.14'")
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the whole group has exited already
        pass


def time_tensorboard(run: Path, final_step: int, log: Path) -> dict:
    """Launches TensorBoard on `run`; seconds until its `loss` scalars include `final_step`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([tensorboard_binary(), "--logdir", str(run), "--port", str(port),
                                 "--host", "127.0.0.1"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    result = {"first_answer_s": None, "final_step_s": None, "points": None, "run": None}
    try:
        while time.perf_counter() - start < TB_TIMEOUT_S and proc.poll() is None:
            runs = _get_json(f"{base}/data/runs")
            if result["first_answer_s"] is None and runs is not None:
                result["first_answer_s"] = time.perf_counter() - start
            if runs:
                name = "." if "." in runs else runs[0]
                query = urllib.parse.urlencode({"run": name, "tag": "loss"})
                points = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
                if points and any(point[1] == final_step for point in points):
                    result.update(final_step_s=time.perf_counter() - start, points=len(points), run=name)
                    break
            time.sleep(TB_POLL_S)
    finally:
        exited = proc.poll()
        _signal_group(proc, signal.SIGTERM)  # its own session: TensorBoard and its data server
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    if result["final_step_s"] is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        result["error"] = (f"exited with {exited}" if exited is not None
                           else f"no step {final_step} within {TB_TIMEOUT_S:g} s") + f"; log: {' | '.join(tail)}"
    return result


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_one(work: Path, steps: int, repeats: int, screenshot: bool) -> dict:
    """One synthetic run of `steps` rows; each timing is the median of `repeats` (every sample kept)."""
    from genfoundry.report import build_report
    from genfoundry.report.browser import open_page

    run = work / f"run-{steps}"
    if run.exists():
        shutil.rmtree(run)
    writes = write_run(run, steps)
    builds, opens, tbs = [], [], []
    for i in range(repeats):
        start = time.perf_counter()
        page = Path(build_report([run]))
        builds.append(time.perf_counter() - start)
    for i in range(repeats):
        opens.append(open_page(page, screenshot=run / "report.png" if screenshot and i == 0 else None, timeout_s=300))
    for i in range(repeats):
        tbs.append(time_tensorboard(run, steps - 1, work / f"tensorboard-{steps}-{i}.log"))
    charts = opens[-1]["status"].get("charts") or []
    events = sorted(run.glob("events.out.tfevents.*"))
    page_samples = {"build_s": builds, **{k: [o[k] for o in opens]
                                          for k in ("first_contentful_paint_ms", "charts_drawn_ms", "load_s")}}
    tb_samples = {k: [t[k] for t in tbs] for k in ("first_answer_s", "final_step_s")}
    return {
        "steps": steps, "metrics_jsonl_bytes": (run / "metrics.jsonl").stat().st_size,
        "write_jsonl_s": writes["jsonl_s"], "write_tensorboard_s": writes["tensorboard_s"],
        "genfoundry": {**{k: _median(v) for k, v in page_samples.items()}, "page_bytes": page.stat().st_size,
                       "charts": len(charts), "charts_drawn": sum(bool(c.get("drawn")) for c in charts),
                       "points": sum(int(c.get("points") or 0) for c in charts),
                       "page_errors": opens[-1]["status"].get("errors") or [],
                       "console_errors": sorted({m for o in opens for m in o["console_errors"]}),
                       "samples": page_samples},
        "tensorboard": {**{k: _median(v) for k, v in tb_samples.items()},
                        "event_bytes": sum(p.stat().st_size for p in events), "event_files": len(events),
                        "loss_points": tbs[-1]["points"], "run": tbs[-1]["run"],
                        "errors": [t["error"] for t in tbs if "error" in t], "samples": tb_samples},
    }


def machine() -> dict:
    import tensorboard

    from genfoundry.report.browser import find_browser

    try:
        browser = subprocess.run([find_browser()[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    except GenfoundryError as e:
        browser = str(e)
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "browser": browser.strip(), "tensorboard": tensorboard.__version__}


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(results: list[dict]) -> str:
    """One line per N: the page's figures, then TensorBoard's."""
    head = (f"{'steps':>7} {'jsonl MB':>8} | {'build s':>7} {'page MB':>7} {'FCP ms':>7} {'drawn ms':>8} "
            f"{'load s':>6} {'charts':>6} {'points':>8} | {'TB MB':>6} {'TB s':>6} {'TB pts':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        g, t = r["genfoundry"], r["tensorboard"]
        lines.append(f"{r['steps']:>7} {r['metrics_jsonl_bytes'] / 1e6:>8.2f} | {g['build_s']:>7.2f} "
                     f"{g['page_bytes'] / 1e6:>7.2f} {_fmt(g['first_contentful_paint_ms'], '7.0f')} "
                     f"{_fmt(g['charts_drawn_ms'], '8.0f')} {g['load_s']:>6.2f} "
                     f"{g['charts_drawn']:>3}/{g['charts']:<2} {g['points']:>8} | {t['event_bytes'] / 1e6:>6.2f} "
                     f"{_fmt(t['final_step_s'], '6.2f')} {_fmt(t['loss_points'], '6d')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="genfoundry bench report", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=DEFAULT_STEPS,
                   help=f"run lengths, one synthetic run each (default: {' '.join(map(str, DEFAULT_STEPS))})")
    p.add_argument("--out", default="benchmarks/results", help="directory of report-bench.json "
                                                                "(default: benchmarks/results)")
    p.add_argument("--work", default=None, help="where the runs are written and kept (default: a temporary "
                                                "directory, removed after)")
    p.add_argument("--repeats", type=int, default=3, help="times each page build, page open and TensorBoard start is "
                                                           "timed; the median is reported (default: 3)")
    p.add_argument("--screenshot", action="store_true", help="also save each page as RUN/report.png (with --work)")
    args = p.parse_args(argv)
    if min(args.steps) < 2:
        raise ConfigError(f"--steps wants run lengths of at least 2 steps, got {min(args.steps)}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    out = writable_directory(args.out, ConfigError)
    with tempfile.TemporaryDirectory(prefix="genfoundry-bench-report-") as scratch:
        work = writable_directory(args.work, ConfigError) if args.work else Path(scratch)
        results = []
        for steps in args.steps:
            results.append(bench_one(work, steps, args.repeats, args.screenshot))
            print(f"steps {steps}: page {results[-1]['genfoundry']['load_s']:.2f} s, "
                  f"TensorBoard {_fmt(results[-1]['tensorboard']['final_step_s'], '.2f')} s", flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    summary = {"benchmark": "report", "date": now.isoformat(timespec="seconds"), "machine": machine(),
               "results": results}
    print(table(results))
    write_atomic(out / "report-bench.json", (json.dumps(summary, indent=1) + "\n").encode())
    print(f"wrote {out / 'report-bench.json'}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except GenfoundryError as e:  # a user mistake: its one-line message, no traceback
        print(f"genfoundry bench report: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
