import json

import numpy as np
import pytest
from PIL import Image

from genfoundry.sources import load_images


def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.returncode == 0
    for command in ("demo", "train", "sample", "eval", "bench"):
        assert command in r.stdout
    for command in ("demo", "train", "sample", "eval"):
        assert cli(command, "--help").returncode == 0


@pytest.mark.timeout(600)
def test_train_sample_eval_end_to_end_from_any_directory(cli, tmp_path):
    """A handful of steps through the CLI, then sampling and FID/KID against a small folder reference."""
    ref = tmp_path / "reference"
    ref.mkdir()
    for i, image in enumerate(load_images("mnist", "test").images[:16]):
        Image.fromarray(image[..., 0]).save(ref / f"{i}.png")
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = cli("train", "--config", "demo", "--train.steps=4", "--train.global_batch_size=8", "--train.log_every=2",
            "--train.val_every=2", "--train.sample_every=2", "--checkpoint.full_every=2", "--sample.steps=2",
            "--sample.per_class=1", f"--eval.reference={ref}", "--eval.num_samples=12", "--eval.kid_subset_size=12",
            cwd=work, env={"GENFOUNDRY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "step      4/4" in r.stdout
    run = work / "runs" / "demo"
    assert (run / "final" / "ema.safetensors").exists() and (run / "samples" / "grid-0000002.png").exists()

    r = cli("sample", run, "--num-images", "6", "--steps", "2", "--out", tmp_path / "s", cwd=work)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s").glob("0*.png"))) == 6
    grid = np.asarray(Image.open(tmp_path / "s" / "grid.png"))
    assert grid.ndim == 2 and grid.std() > 0

    r = cli("eval", run, cwd=work, env={"GENFOUNDRY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "FID" in r.stdout and "12 generated vs 16 reference" in r.stdout
    result = json.loads((run / "eval" / "fid-12.json").read_text())
    assert result["fid"] > 0 and result["kid_mean"] is not None and result["num_generated"] == 12


def test_missing_run_dir_is_one_clear_error(cli, tmp_path):
    r = cli("sample", tmp_path / "nope")
    assert r.returncode == 2 and "is not a run directory" in r.stderr and "Traceback" not in r.stderr


def test_bench_train_measures_ours_and_the_baseline(cli, tmp_path):
    out = tmp_path / "train.json"
    # fp32: bf16 products on a CPU without bf16 units are several times slower, and time is all this would test
    r = cli("bench", "train", "--preset", "DiT-T/4", "--batch-size", "4", "--steps", "1", "--compile", "none",
            "--precision", "fp32", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    import json

    results = json.loads(out.read_text())["results"]
    assert [x["impl"] for x in results] == ["genfoundry", "baseline"]
    assert all(x["images_per_s"] > 0 and x["gflops_per_forward"] > 0 for x in results)
    assert [x["timed"] for x in results] == ["Trainer.train_step", "plain_step"]
    assert results[0]["baseline_images_per_s"] == results[1]["images_per_s"]
    assert "trainer / plain loop" in r.stdout
