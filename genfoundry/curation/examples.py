"""Thumbnails of a few dropped inputs per reason, so that a person (or the report) can see what a rule
removed before trusting it."""

from __future__ import annotations

import io
import json
from pathlib import Path

from genfoundry.checkpoint.storage import write_atomic

EXAMPLES = "examples"
PER_REASON = 8
SIDE = 128


def write(outdir: Path, rows: list[dict], per_reason: int = PER_REASON) -> dict[str, list[dict]]:
    """examples/<reason>/<n>.jpg for the first `per_reason` dropped inputs of each reason that still
    decode, and examples/index.json: {reason: [{"source", "file" or None, "message"}]}."""
    from genfoundry.curation.deep import upright
    from genfoundry.sources import read_input

    chosen: dict[str, list[dict]] = {}
    for row in rows:
        if row["decision"] == "drop" and len(chosen.setdefault(row["reason"], [])) < per_reason:
            chosen[row["reason"]].append(row)
    for old in (outdir / EXAMPLES).glob("*/*.jpg"):  # a previous run's; index.json says which are current
        old.unlink()
    index = {}
    for reason, picked in sorted(chosen.items()):
        folder = outdir / EXAMPLES / reason
        entries = []
        for n, row in enumerate(picked):
            file = None
            if "item" in row and row.get("width"):  # a file whose header parsed: it may decode
                try:
                    image = upright(read_input(row["item"].source, row["item"].at))
                    image.thumbnail((SIDE, SIDE))
                    buffer = io.BytesIO()
                    image.save(buffer, "JPEG", quality=85)
                    folder.mkdir(parents=True, exist_ok=True)
                    write_atomic(folder / f"{n}.jpg", buffer.getvalue())
                    file = f"{reason}/{n}.jpg"
                except Exception:  # it does not decode (that may be why it was dropped): listed without one
                    file = None
            entries.append({"source": row["source"], "file": file, "message": row.get("message")})
        index[reason] = entries
    (outdir / EXAMPLES).mkdir(exist_ok=True)
    write_atomic(outdir / EXAMPLES / "index.json", json.dumps(index, indent=1).encode())
    return index
