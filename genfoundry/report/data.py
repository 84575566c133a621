"""What a report shows, read from the files a run and a curation leave: metrics.jsonl, config.toml,
samples/, eval/, checkpoint events; summary.json, manifest.parquet and examples/ of a curation.

Every metric travels whole: each column as float32, its bytes split into four planes (the high bytes
of neighbouring values are alike, so they compress), deflated and base64-encoded. The page inflates
them with the browser's own DecompressionStream.
"""

from __future__ import annotations

import base64
import json
import math
import re
import tomllib
import zlib
from pathlib import Path

import numpy as np

from genfoundry import rundir
from genfoundry.errors import GenfoundryError

SAMPLE_BYTES = 8 * 2**20  # the sample grids a page embeds, at most; evenly spaced ones past that
HISTOGRAM_BINS = 60


class ReportError(GenfoundryError):
    """A directory that is not a run (or a curation), or files in it that cannot be read."""


def pack_columns(columns: list[np.ndarray]) -> str:
    """Equal-length float columns -> one base64 string of deflated, byte-plane-split float32."""
    if not columns:
        return ""
    table = np.ascontiguousarray(np.stack([np.asarray(c, dtype="<f4") for c in columns]))
    planes = table.view(np.uint8).reshape(len(columns), -1, 4).transpose(0, 2, 1)
    return base64.b64encode(zlib.compress(np.ascontiguousarray(planes).tobytes(), 6)).decode()


def unpack_columns(blob: str, count: int) -> np.ndarray:
    """The inverse of `pack_columns` (the page does the same in JavaScript; tests use this one)."""
    planes = np.frombuffer(zlib.decompress(base64.b64decode(blob)), dtype=np.uint8).reshape(count, 4, -1)
    return np.ascontiguousarray(planes.transpose(0, 2, 1)).view("<f4").reshape(count, -1)


# ---- charts: which metrics share one ------------------------------------------------------------

SECTIONS = ("Loss", "Optimization", "Throughput", "Memory", "Communication", "Checkpoints and faults", "Data",
            "Other")
# Metrics drawn together on one chart (the first names it); a name's .min/.max go with it.
GROUPS = {"loss": ("loss", "val_loss", "val_loss_ema")}
# Noisy metrics get the smoothed line (validation losses are of fixed images and noise: already smooth).
SMOOTHED = {"loss", "grad_norm", "images_per_s", "mfu", "data/wait_fraction", "comm/bytes_per_step",
            "comm/dense_bytes_per_step", "comm/compression_ratio", "checkpoint/stall_s"}
TITLES = {"loss": "loss (training, validation, validation of the EMA)", "lr": "learning rate",
          "grad_norm": "gradient norm", "images_per_s": "images/s", "mfu": "MFU",
          "data/wait_fraction": "data wait (fraction of step time)",
          "memory_allocated_gb": "accelerator memory allocated (GiB)",
          "peak_memory_gb": "peak accelerator memory (GiB)",
          "checkpoint/stall_s": "checkpoint stall (s training paused)", "eta_s": "time left (s)"}


def section_of(name: str) -> str:
    if name in ("loss", "val_loss", "val_loss_ema"):
        return "Loss"
    if name in ("lr", "grad_norm", "loss_scale", "skipped_steps", "nonfinite_steps", "precision_fallback"):
        return "Optimization"
    if name in ("images_per_s", "mfu", "eta_s", "images_seen", "data/wait_fraction"):
        return "Throughput"
    if "memory" in name:
        return "Memory"
    if name.startswith("comm/"):
        return "Communication"
    if name.startswith("checkpoint/") or name in ("restarts", "rollbacks"):
        return "Checkpoints and faults"
    if name.startswith("data/"):
        return "Data"
    return "Other"


def chart_specs(names: set[str]) -> list[dict]:
    """One chart per metric (with its .min/.max, and the members of its group), in section order."""
    grouped = {m: lead for lead, members in GROUPS.items() for m in members}
    leads: dict[str, list[str]] = {}
    for name in sorted(names):
        base = name[:-4] if name.endswith((".min", ".max")) and name[:-4] in names else name
        lead = grouped.get(base, base)
        leads.setdefault(lead, [])
        if name not in leads[lead]:
            leads[lead].append(name)
    specs = []
    for lead, members in leads.items():
        order = list(GROUPS.get(lead, (lead,)))
        members.sort(key=lambda m: (order.index(m[:-4] if m.endswith((".min", ".max")) else m)
                                    if (m[:-4] if m.endswith((".min", ".max")) else m) in order else len(order), m))
        specs.append({"id": "chart-" + re.sub(r"[^a-z0-9]+", "-", lead.lower()).strip("-"),
                      "title": TITLES.get(lead, lead), "section": section_of(lead),
                      "smooth": [m for m in members if m in SMOOTHED],
                      "series": [{"metric": m, "role": "band" if m.endswith((".min", ".max")) else "main"}
                                 for m in members]})
    specs.sort(key=lambda s: (SECTIONS.index(s["section"]), s["title"]))
    return specs


# ---- one run -------------------------------------------------------------------------------------

def read_run(run_dir: str | Path, name: str | None = None) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / rundir.METRICS
    if not path.is_file():
        why = "does not exist" if not run_dir.exists() else "has no metrics.jsonl (is it a run directory?)"
        raise ReportError(f"'{run_dir}' {why}")
    try:
        every = rundir.read_jsonl(path, all_rows=True)
    except rundir.MetricsError as e:
        raise ReportError(str(e)) from None
    kept = rundir.kept_rows(every)
    config_text = _read_text(run_dir / "config.toml")
    try:
        config = tomllib.loads(config_text) if config_text else {}
    except tomllib.TOMLDecodeError as e:
        raise ReportError(f"{run_dir / 'config.toml'} is not TOML: {e}") from None
    batch = config.get("train", {}).get("global_batch_size", 0)
    start = min((r["time"] for r in every if isinstance(r.get("time"), (int, float))), default=0.0)
    keys: set[str] = set()
    for r in kept:
        keys.update(r)
    values = {k: [math.nan] * len(kept) for k in keys - {"format_version", "step", "time", "event"}}
    for j, r in enumerate(kept):  # one pass over each row's items: a long run has millions of values
        for k, v in r.items():
            column = values.get(k)
            if column is not None and v.__class__ in (int, float):  # numbers only; bool is not one
                column[j] = v
    numeric = {k: np.array(v) for k, v in values.items()}
    names = sorted(k for k, v in numeric.items() if not np.isnan(v).all())  # text-only keys have no chart
    columns = [np.array([r["step"] for r in kept], dtype=np.float64),
               np.array([r.get("time", start) - start for r in kept], dtype=np.float64)]
    columns += [numeric[n] for n in names]
    constant = {}  # metrics that never changed: a table row each instead of a flat chart
    for n, column in zip(names, columns[2:]):
        finite = column[np.isfinite(column)]
        if len(finite) and (finite == finite[0]).all():
            constant[n] = float(finite[0])
    attempts = [r for r in every if "event" not in r]
    events = [{k: v for k, v in r.items() if k != "format_version"} | {"time": r.get("time", start) - start}
              for r in every if "event" in r]
    return {
        "name": name or run_dir.name, "path": str(run_dir), "config": config_text,
        "columns": ["step", "time", *names], "rows": len(kept), "table": pack_columns(columns),
        # every row as written, abandoned attempts too: the timeline shows where a run went back
        "attempts": pack_columns([np.array([r.get("time", start) - start for r in attempts]),
                                  np.array([r["step"] for r in attempts], dtype=np.float64)]),
        "attempt_rows": len(attempts), "events": events, "constant": constant,
        "goodput": goodput(every, kept, batch), "fid": read_fid(run_dir), "samples": read_samples(run_dir),
        "last": {n: kept[-1][n] for n in ("step", "loss", "val_loss", "val_loss_ema", "images_per_s", "mfu")
                 if kept and _finite(kept[-1].get(n))},
        "best_val_loss": min((r["val_loss"] for r in kept if _finite(r.get("val_loss"))), default=None),
    }


def _finite(value) -> bool:
    return value.__class__ in (int, float) and math.isfinite(value)


def _read_json(path: Path, what: type = dict):
    """A JSON file's object (or list), or None when the file is missing; anything else is a ReportError."""
    text = _read_text(path)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ReportError(f"{path} is not JSON: {e}") from None
    if not isinstance(value, what):
        raise ReportError(f"{path} does not hold a JSON {what.__name__}")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def goodput(every: list[dict], kept: list[dict], batch: int) -> dict:
    """Where the wall time went: training steps the final weights keep, steps done again after a restart
    or a rollback, time down between attempts, and the rest (start-up, validation, samples, saves).

    A row's training time is its steps times the global batch over its images/s (measured without
    validation). goodput = kept training time / wall time."""
    # The run's own rows: an evaluation appended a day later is not the run's wall time.
    times = [r["time"] for r in every if isinstance(r.get("time"), (int, float)) and r.get("event") != "eval"]
    wall = max(times) - min(times) if times else 0.0
    lost_steps = set()
    for r in every:
        if r.get("event") == "rollback" and isinstance(r.get("to_step"), int):
            lost_steps.update(range(r["to_step"] + 1, r["step"] + 1))
    kept_ids = {id(r) for r in kept}

    # A row's interval starts at the previous row of the same attempt (rows between resumes).
    attempt, previous_step = [], None
    for r in every:
        if r.get("event") == "resume":
            previous_step = r["step"]
        elif "event" not in r:
            attempt.append((r, previous_step))
            previous_step = r["step"]
    useful = wasted = 0.0
    for r, prev in attempt:
        ips = r.get("images_per_s")
        if prev is None or not isinstance(ips, (int, float)) or ips <= 0 or not batch or r["step"] <= prev:
            continue
        s = (r["step"] - prev) * batch / ips
        lost = (sum(1 for k in range(prev + 1, r["step"] + 1) if k in lost_steps) / (r["step"] - prev)
                if lost_steps else 0.0)
        if id(r) in kept_ids:
            useful += s * (1 - lost)
            wasted += s * lost
        else:
            wasted += s
    down, last_time = 0.0, None
    for r in every:
        if r.get("event") == "resume" and last_time is not None:
            down += max(r["time"] - last_time, 0.0)
        if isinstance(r.get("time"), (int, float)):
            last_time = r["time"]
    return {"wall_s": wall, "training_s": useful, "redone_s": wasted, "down_s": down,
            "other_s": max(wall - useful - wasted - down, 0.0),
            "goodput": useful / wall if wall > 0 and batch else None}  # no batch (no config.toml): unknown


def read_fid(run_dir: Path) -> list[dict]:
    """Every FID the run was scored with (eval/fid-*.json), by step."""
    out = []
    for path in sorted((run_dir / "eval").glob("fid-*.json")):
        result = _read_json(path) or {}
        if _finite(result.get("fid")) and isinstance(result.get("step"), int):
            out.append({k: result.get(k) for k in ("step", "fid", "kid_mean", "num_generated", "weights",
                                                    "reference")} | {"file": path.name})
    return sorted(out, key=lambda r: (r["step"], r["file"]))


def read_samples(run_dir: Path) -> dict:
    """The sample grids written during training (and the final one), as data URLs, oldest first."""
    folder = run_dir / "samples"
    grids = []
    for path in folder.glob("*.png") if folder.is_dir() else ():
        match = re.fullmatch(r"grid-(\d+)\.png", path.name)
        if match or path.name == "final.png":
            grids.append((int(match.group(1)) if match else math.inf, path))
    grids.sort()
    sizes = [p.stat().st_size for _, p in grids]
    chosen = list(range(len(grids)))
    if sum(sizes) > SAMPLE_BYTES:  # evenly spaced, always the last
        per = sum(sizes) / len(sizes)
        keep = max(int(SAMPLE_BYTES // per), 2)
        chosen = sorted({round(i * (len(grids) - 1) / (keep - 1)) for i in range(keep)})
    shown = []
    for i in chosen:
        step, path = grids[i]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
        shown.append({"step": None if step == math.inf else step, "name": path.name,
                      "src": "data:image/png;base64," + base64.b64encode(data).decode()})
    return {"grids": shown, "total": len(grids)}


# ---- a curation ----------------------------------------------------------------------------------

def read_curation(folder: str | Path) -> dict:
    from genfoundry.curation import manifest as mf

    folder = Path(folder)
    summary = _read_json(folder / mf.SUMMARY)
    if summary is None:
        raise ReportError(f"'{folder}' is not a curation output ({mf.SUMMARY} is missing)")
    missing = [k for k in ("num_inputs", "num_kept", "num_readable", "utilization") if k not in summary]
    if missing:
        raise ReportError(f"{folder / mf.SUMMARY} lacks {', '.join(missing)} (not written by genfoundry curate?)")
    return {"path": str(folder), "summary": summary, "funnel_svg": _read_text(folder / mf.FUNNEL),
            "histograms": _histograms(folder / mf.MANIFEST, summary.get("thresholds", {})),
            "examples": _examples(folder)}


def _histograms(path: Path, thresholds: dict) -> list[dict]:
    """Per score column: counts of kept and dropped inputs in equal bins, and the threshold."""
    if not path.is_file():
        return []
    from genfoundry.curation import manifest as mf

    mf._pa()  # pyarrow, or one error saying how to install it
    table = mf._read_table(path)
    if table is None or "decision" not in table.column_names:
        raise ReportError(f"{path} is not a curation manifest (not Parquet, or no 'decision' column)")
    decisions = np.array(table.column("decision").to_pylist())
    out = []
    for column in [c for c in table.column_names if c.startswith("score_") or c == "mahalanobis"]:
        values = np.array([np.nan if v is None else v for v in table.column(column).to_pylist()], dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            continue
        cut = thresholds.get(column, {})
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if isinstance(cut.get("threshold"), (int, float)):
            lo, hi = min(lo, cut["threshold"]), max(hi, cut["threshold"])
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, HISTOGRAM_BINS + 1)
        kept = np.histogram(values[finite & (decisions == "keep")], edges)[0]
        dropped = np.histogram(values[finite & (decisions != "keep")], edges)[0]
        out.append({"column": column, "id": "hist-" + re.sub(r"[^a-z0-9]+", "-", column.lower()),
                    "centers": ((edges[:-1] + edges[1:]) / 2).tolist(), "width": float(edges[1] - edges[0]),
                    "kept": kept.tolist(), "dropped": dropped.tolist(), "threshold": cut.get("threshold"),
                    "drop_above": cut.get("drop_above"), "reason": cut.get("reason"), "scored": int(finite.sum())})
    return out


def _examples(folder: Path) -> dict:
    from genfoundry.curation.examples import EXAMPLES

    index = _read_json(folder / EXAMPLES / "index.json")
    if index is None:
        return {}
    out = {}
    for reason, entries in index.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ReportError(f"{folder / EXAMPLES / 'index.json'}: '{reason}' is not a list of examples")
        shown = []
        for entry in entries:
            src = None
            if entry.get("file"):
                try:
                    src = "data:image/jpeg;base64," + base64.b64encode((folder / EXAMPLES / entry["file"])
                                                                       .read_bytes()).decode()
                except OSError:
                    src = None  # index.json names it, the file is gone: the entry shows without a picture
            shown.append({"source": entry.get("source"), "message": entry.get("message"), "src": src})
        out[reason] = shown
    return out


# ---- a study (genfoundry tune) --------------------------------------------------------------------

STUDY_FILE = "trials.json"
STUDY_RUNS = 20  # completed trials whose runs a study's page draws, the best first


def is_study(folder: str | Path) -> bool:
    """A `genfoundry tune` study directory: it holds trials.json (and is not itself a run)."""
    folder = Path(folder)
    return (folder / STUDY_FILE).is_file() and not (folder / rundir.METRICS).is_file()


def read_study(folder: str | Path) -> dict:
    """trials.json of a study, each trial with the run directory found beside it, and the runs of the
    best `STUDY_RUNS` completed trials for the charts."""
    folder = Path(folder)
    path = folder / STUDY_FILE
    info = _read_json(path)
    if info is None:
        raise ReportError(f"'{folder}' is not a study ({STUDY_FILE} is missing)")
    missing = [k for k in ("study", "metric", "search", "trials") if k not in info]
    if missing or not isinstance(info["trials"], list) or not isinstance(info["search"], dict):
        raise ReportError(f"{path} lacks {', '.join(missing) or 'a list of trials'} (not written by genfoundry tune?)")
    trials = []
    for t in info["trials"]:
        if not isinstance(t, dict) or not isinstance(t.get("number"), int) or not isinstance(t.get("state"), str):
            raise ReportError(f"{path}: a trial without a number and a state")
        run = _trial_dir(folder, t)
        trials.append({**t, "path": str(run) if run else None,
                       "has_metrics": bool(run and (run / rundir.METRICS).is_file()),
                       "has_report": bool(run and (run / "report.html").is_file())})
    best = (info.get("best") or {}).get("number")
    done = sorted((t for t in trials if t["state"] == "COMPLETE" and _finite(t.get("value")) and t["has_metrics"]),
                  key=lambda t: (t["value"], t["number"]))
    return {"name": str(info["study"]), "path": str(folder), "metric": info["metric"], "search": list(info["search"]),
            "spaces": info["search"], "trials": trials, "best": best, "counts": info.get("counts", {}),
            "wanted": info.get("trials_wanted"), "storage": info.get("storage"), "updated": info.get("updated"),
            "runs": [Path(t["path"]) for t in done[:STUDY_RUNS]], "completed": len(done)}


def _trial_dir(folder: Path, trial: dict) -> Path | None:
    """A trial's run directory: beside trials.json (where tune puts it, wherever the study was moved), or
    where trials.json says."""
    given = trial.get("run_dir") or trial.get("run")
    if not isinstance(given, str) or not given:
        return None
    beside = folder / Path(given).name
    return beside if beside.is_dir() else Path(given)
