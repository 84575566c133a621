"""Gradient compression on the same training run: bytes on the wire, time per step, validation loss.

Each method trains the same recipe, seed and number of steps on N ranks (through torchrun); the
figures come from the runs' own metrics.jsonl. Bytes per step are the post-warm-up steady state
(the last report interval).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from genfoundry import metrics
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.distributed.launch import torchrun_command
from genfoundry.progress import bar

METHODS = ("none", "topk", "powersgd")


def train_run(method: str, nproc: int, recipe: str, overrides: list[str], root: Path) -> dict:
    """Trains one method's run, or reads it if a finished run of it is already in `root`."""
    if not (root / method / "final" / "model.json").is_file():
        _train(method, nproc, recipe, overrides, root)
    return _summary(method, root)


def _train(method: str, nproc: int, recipe: str, overrides: list[str], root: Path) -> None:
    args = torchrun_command(nproc, "genfoundry", [
        "train", "--config", recipe, f"--run.root={root}", f"--run.name={method}", f"--parallel.comm_hook={method}",
        "--train.sample_every=0", "--checkpoint.full_every=0", *overrides])
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the {method} run failed:\n{result.stderr[-3000:]}")


def _summary(method: str, root: Path) -> dict:
    rows = metrics.read_jsonl(root / method / "metrics.jsonl")
    timed = [r for r in rows if r.get("images_per_s")]
    last = rows[-1]
    steps_per_s = [r["images_per_s"] for r in timed[1:]] or [r["images_per_s"] for r in timed]
    return {
        "method": method, "val_loss": last["val_loss"], "val_loss_ema": last["val_loss_ema"],
        "bytes_per_step": last.get("comm/bytes_per_step"),
        "dense_bytes_per_step": last.get("comm/dense_bytes_per_step"),
        "images_per_s": sum(steps_per_s) / len(steps_per_s),
    }


def run(nproc: int = 2, recipe: str = "mnist", overrides: list[str] | None = None, out: str | None = None,
        methods=METHODS, workdir: str | None = None) -> list[dict]:
    overrides = overrides or []
    root = Path(workdir or tempfile.mkdtemp(prefix="genfoundry-compression-"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    with bar(len(methods), "bench compression", unit="run") as shown:
        for method in methods:
            r = train_run(method, nproc, recipe, overrides, root)
            results.append(r)
            shown.update()
            with shown.external_write_mode():
                print(f"{method:>9}: val_loss {r['val_loss']:.4f} (ema {r['val_loss_ema']:.4f}), "
                      f"{r['images_per_s']:.1f} images/s, bytes/step {r['bytes_per_step'] or 'n/a'}", flush=True)
    base = next((r for r in results if r["method"] == "none"), None)
    for r in results:
        if base is None or r is base:
            continue
        dense = r["dense_bytes_per_step"] or 0
        r["compression"] = dense / r["bytes_per_step"] if r["bytes_per_step"] else None
        r["val_loss_vs_none"] = r["val_loss"] / base["val_loss"] - 1
        r["speed_vs_none"] = r["images_per_s"] / base["images_per_s"]
        print(f"{r['method']:>9}: {r['compression']:.1f}x fewer bytes than the dense all-reduce, validation "
              f"loss {r['val_loss_vs_none']:+.2%} vs none, speed {r['speed_vs_none']:.2f}x")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), json.dumps({"format_version": 1, "benchmark": "compression", "nproc": nproc,
                                            "recipe": recipe, "overrides": overrides, "results": results},
                                           indent=2).encode())
    return results
