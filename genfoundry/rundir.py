"""What a run directory holds, read without torch (the report imports this, never the trainer):
metrics.jsonl's rows as they stand after restarts."""

from __future__ import annotations

import json
from pathlib import Path

from genfoundry.errors import GenfoundryError

METRICS = "metrics.jsonl"


class MetricsError(GenfoundryError):
    """A metrics.jsonl that cannot be read, or holds a line that is not a metrics row."""


def read_jsonl(path: str | Path, all_rows: bool = False) -> list[dict]:
    """The metric rows of the run as it went on, in step order; `all_rows` gives every row as written.

    A resumed run starts again from its checkpoint, so the file repeats the steps after it. A resume
    row at step k drops the rows after k written before it (the abandoned attempt, whatever steps it
    logged), and of rows for the same step the newest is kept. Event rows are left out.

    A last line cut short (a crash mid-write, or a live run read while it appends) is left out; a bad
    line elsewhere is a MetricsError naming it."""
    try:
        with open(path, "rb") as f:
            lines = [line for line in f.read().decode("utf-8", "replace").split("\n") if line.strip()]
    except FileNotFoundError:
        raise
    except OSError as e:
        raise MetricsError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row (an object with an integer 'step')")
        except ValueError as e:
            if number == len(lines):
                break
            raise MetricsError(f"{path}, line {number}: {e}") from None
        rows.append(row)
    return rows if all_rows else kept_rows(rows)


def kept_rows(rows: list[dict]) -> list[dict]:
    """Of every row as written, the metric rows that stand (see `read_jsonl`), the same objects."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if row.get("event") == "resume":
            by_step = {s: r for s, r in by_step.items() if s <= row["step"]}
        elif "event" not in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
