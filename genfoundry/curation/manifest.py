"""What curation writes: part files under work/, then manifest.parquet, kept.parquet, summary.json and
the funnel pictures. Every file is written whole or not at all (`write_atomic`)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from genfoundry.checkpoint.storage import TEMPORARY, write_atomic
from genfoundry.curation.inputs import raw

MANIFEST = "manifest.parquet"
KEPT = "kept.parquet"
SUMMARY = "summary.json"
FUNNEL = "funnel.svg"
REASONS = "reasons.svg"
FORMAT_VERSION = 1
STAGES = ("list", "basic", "semantic", "quality")

# The manifest's fixed columns and their Arrow types; score_<filter> and mahalanobis follow as float64.
COLUMNS = {"source": "string", "source_bytes": "binary", "label": "string", "caption": "string", "bytes": "int64",
           "sha256": "string", "format": "string", "width": "int64", "height": "int64", "mode": "string",
           "frames": "int64", "converted": "string", "phash": "string", "pixel_std": "float64",
           "stage": "string", "decision": "string", "reason": "string", "message": "string",
           "duplicate_of": "string"}
BASIC_FIELDS = [k for k in COLUMNS if k not in ("source", "source_bytes", "label", "caption", "duplicate_of")]


def _pa():
    from genfoundry.curation.filters import require

    return require("pyarrow", "pip install 'genfoundry[curate]'", "curation's Parquet manifest")


def _table_bytes(columns: dict[str, list], types: dict[str, str], meta: dict | None = None) -> bytes:
    pa = _pa()
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, types[name])()) for name in columns])
    table = pa.Table.from_pydict(columns, schema=schema)
    if meta:
        table = table.replace_schema_metadata({k: json.dumps(v) for k, v in meta.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _read_table(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception:  # a part torn by a crash of an older version, or not Parquet: redone
        return None


def part_path(work: Path, stage: str, k: int) -> Path:
    return work / f"{stage}-{k:06d}.parquet"


def write_part(work: Path, stage: str, k: int, recipe: str, rows: list[dict]) -> None:
    columns = {key: [r.get(key) for r in rows] for key in BASIC_FIELDS}
    write_atomic(part_path(work, stage, k), _table_bytes(columns, COLUMNS, {"recipe": recipe}))


def read_part(work: Path, stage: str, k: int, recipe: str) -> list[dict] | None:
    """A slice's rows from a finished part of the same recipe, else None."""
    path = part_path(work, stage, k)
    if not path.is_file():
        return None
    table = _read_table(path)
    meta = (table.schema.metadata or {}) if table is not None else {}
    if table is None or json.loads(meta.get(b"recipe", b"null")) != recipe:
        return None
    return table.to_pylist()


def write_scores(work: Path, k: int, recipe: str, index: list[int], scores: dict) -> None:
    arrays = {key: value for key, value in scores.items() if key != "failures"}
    buffer = io.BytesIO()
    np.savez(buffer, recipe=recipe, index=np.asarray(index, np.int64),
             failures=json.dumps({str(i): r for i, r in scores["failures"].items()}), **arrays)
    write_atomic(work / f"deep-{k:06d}.npz", buffer.getvalue())


def read_scores(work: Path, k: int, recipe: str) -> dict | None:
    path = work / f"deep-{k:06d}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if str(f["recipe"]) != recipe:
                return None
            out = {key: f[key] for key in f.files if key not in ("recipe", "failures")}
            out["failures"] = {int(i): r for i, r in json.loads(str(f["failures"])).items()}
            return out
    except (OSError, ValueError, KeyError):  # torn or foreign: redone
        return None


def write_reference(work: Path, recipe: str, features: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, recipe=recipe, features=features.astype(np.float32))
    write_atomic(work / "reference.npz", buffer.getvalue())


def read_reference(work: Path, recipe: str) -> np.ndarray | None:
    path = work / "reference.npz"
    try:
        with np.load(path) as f:
            return f["features"] if str(f["recipe"]) == recipe else None
    except (OSError, ValueError, KeyError):
        return None


def remove_leftovers(outdir: Path) -> None:
    """Temporary files of a run that was killed mid-write; the finished files beside them are intact."""
    for folder in (outdir, outdir / "work"):
        for p in folder.glob(f".*{TEMPORARY}*"):
            p.unlink(missing_ok=True)


def _columns(rows: list[dict], extra: list[str]) -> tuple[dict, dict]:
    types = dict(COLUMNS, **{name: "float64" for name in extra})
    columns = {}
    for name in types:
        if name == "source_bytes":
            columns[name] = [raw(r["item"].source) if "item" in r else None for r in rows]
        elif name == "label":
            columns[name] = [r["item"].label if "item" in r else None for r in rows]
        elif name == "caption":
            columns[name] = [r["item"].caption if "item" in r else None for r in rows]
        else:
            columns[name] = [r.get(name) for r in rows]
    return columns, types


def summarize(rows: list[dict], quality: dict, filters: list[str], counts: dict) -> dict:
    reached = Counter(r["stage"] for r in rows)
    reasons = Counter(r["reason"] for r in rows if r["decision"] == "drop")
    by_stage: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["decision"] == "drop":
            by_stage.setdefault(r["stage"], Counter())[r["reason"]] += 1
    unreadable = {"vanished", "unreadable", "empty", "not-an-image", "corrupt-header", "truncated", "decode-error",
                  "symlink-loop", "broken-link", "unreadable-folder", "unreadable-archive", "empty-path"}
    kept = sum(r["decision"] == "keep" for r in rows)
    readable = sum(not (r["decision"] == "drop" and r["reason"] in unreadable) for r in rows)
    funnel, remaining = [], len(rows)
    for stage in STAGES:
        dropped = sum(by_stage.get(stage, {}).values())
        if stage == "list" and not dropped:
            continue
        funnel.append({"stage": stage, "entered": remaining, "dropped": dropped, "left": remaining - dropped})
        remaining -= dropped
    return {"format_version": FORMAT_VERSION, "num_inputs": len(rows), "num_kept": kept, "num_readable": readable,
            "utilization": kept / readable if readable else 0.0, "funnel": funnel,
            "dropped_by_stage": {s: dict(sorted(c.items())) for s, c in by_stage.items()},
            "reasons": dict(reasons.most_common()), "stage_reached": dict(reached), "filters": filters,
            "duplicates": counts, "quality": quality}


def _svg_bars(title: str, bars: list[tuple[str, int, str]], total: int) -> str:
    """A horizontal bar chart as a self-contained SVG: (label, value, colour) per bar."""
    from html import escape

    width, left, height = 720, 210, 28
    scale = (width - left - 90) / max(total, 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + height * len(bars)}" '
           f'font-family="sans-serif" font-size="13">', f'<text x="8" y="20" font-weight="bold">{escape(title)}</text>']
    for n, (label, value, colour) in enumerate(bars):
        y = 32 + n * height
        out.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y + 4}" width="{max(value * scale, 1):.1f}" height="{height - 8}" '
                   f'fill="{colour}"/>')
        out.append(f'<text x="{left + value * scale + 6:.1f}" y="{y + 17}">{value}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def funnel_svg(summary: dict) -> str:
    bars = [(f"in ({summary['num_inputs']})", summary["num_inputs"], "#4c78a8")]
    for step in summary["funnel"]:
        bars.append((f"after {step['stage']} (-{step['dropped']})", step["left"], "#4c78a8"))
    return _svg_bars(f"curation funnel: {summary['num_kept']} of {summary['num_inputs']} kept "
                     f"(utilization {summary['utilization']:.1%})", bars, summary["num_inputs"])


def reasons_svg(summary: dict) -> str:
    colours = {"list": "#9d755d", "basic": "#e45756", "semantic": "#f58518", "quality": "#54a24b"}
    bars = [(f"{stage}: {reason}", n, colours[stage]) for stage, reasons in summary["dropped_by_stage"].items()
            for reason, n in reasons.items()]
    return _svg_bars("dropped, by stage and reason", bars, max([n for _, n, _ in bars], default=1))


def write_outputs(outdir: Path, result: dict, cfg, sources: list, counts: dict, seconds: dict) -> dict:
    """manifest.parquet, kept.parquet, summary.json and the two pictures; returns the summary."""
    import dataclasses

    rows = result["rows"]
    extra = [f"score_{name}" for name in result["filters"]] + (["mahalanobis"] if result["quality_run"] else [])
    columns, types = _columns(rows, extra)
    meta = {"format_version": FORMAT_VERSION, "sources": [str(s) for s in sources], "config": dataclasses.asdict(cfg)}
    write_atomic(outdir / MANIFEST, _table_bytes(columns, types, meta))
    kept = [i for i, r in enumerate(rows) if r["decision"] == "keep"]
    kept_columns = ["source", "source_bytes", "label", "caption", "sha256", "width", "height", "pixel_std", *extra]
    write_atomic(outdir / KEPT, _table_bytes({"path" if c == "source" else c: [columns[c][i] for i in kept]
                                              for c in kept_columns},
                                             dict(types, path="string"), meta))
    summary = summarize(rows, result["quality"], result["filters"],
                        dict(counts, semantic=result["semantic_duplicates"]))
    summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}  # this run's: resumed work is not redone
    summary["thresholds"] = result["thresholds"]
    write_atomic(outdir / SUMMARY, json.dumps(summary, indent=1).encode())
    write_atomic(outdir / FUNNEL, funnel_svg(summary).encode())
    write_atomic(outdir / REASONS, reasons_svg(summary).encode())
    return summary


def summary_line(summary: dict, outdir: Path) -> str:
    parts = [f"kept {summary['num_kept']} of {summary['num_inputs']} inputs (utilization "
             f"{summary['utilization']:.1%} of {summary['num_readable']} readable) in {outdir}"]
    if summary["reasons"]:
        parts.append("dropped: " + ", ".join(f"{reason} {n}" for reason, n in summary["reasons"].items()))
    q = summary["quality"]
    if q.get("fd_kept") is not None:
        parts.append(f"FD to the reference: kept {q['fd_kept']:.2f}, random subset of the same size "
                     f"{q['fd_random']:.2f}")
    return "; ".join(parts)
