"""`genfoundry bench sample`: both parts run end to end on a tiny scale and write what they print."""

import json
from pathlib import Path

import pytest

from genfoundry.bench.sample import parse_config
from genfoundry.errors import ConfigError


def test_speed_part_times_ours_and_the_diffusers_pipeline(cli, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "speed.json"
    r = cli("bench", "sample", "--preset", "DiT-T/2", "--batch-size", "2", "--nfe", "1,2", "--repeats", "1",
            "--no-compile-alone", "--precision", "fp32", "--precision", "fp8", "--interval", "0.2-0.8", "--device",
            "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["speed"][0]
    assert row["preset"] == "DiT-T/2" and set(row["images_per_s"]) == {"fp32", "fp8"}
    assert set(row["images_per_s"]["fp8"]) == {"1", "2"} and set(row["baseline_images_per_s"]) == {"1", "2"}
    for key in ("one_pass_images_per_s", "interval_images_per_s"):
        assert set(row[key]) == {"fp32", "fp8"} and all(v > 0 for v in row[key]["fp32"].values())
    assert row["guidance_interval"] == [0.2, 0.8] and "one pass (distilled guidance)" in r.stdout
    assert all(v > 0 for v in row["forward_passes_per_s"].values())
    assert "NFE 2: genfoundry fp8" in r.stdout and "diffusers" in r.stdout


def test_config_triples_and_their_options():
    assert parse_config("heun/karras/15") == ("heun", "karras", 8, {})
    assert parse_config("dpm++2m/logsnr/12/precision=fp8/cfg=2") == ("dpm++2m", "logsnr", 12,
                                                                     {"precision": "fp8", "cfg": 2.0})
    assert parse_config("euler/uniform/8/interval=0.1-0.7/model=teacher") == (
        "euler", "uniform", 8, {"interval": (0.1, 0.7), "model": "teacher"})
    for bad in ("rk4/uniform/8", "euler/cosine/8", "euler/uniform/x", "euler/uniform/8/speed=2",
                "euler/uniform/8/guidance=wave", "euler/uniform/8/shift=big", "euler/uniform/8/interval=0.7-0.1",
                "euler/uniform/8/interval=0.5", "euler/uniform/8/model=pupil"):
        with pytest.raises(ConfigError, match="solver/schedule/nfe"):
            parse_config(bad)
    with pytest.raises(ConfigError, match="student's guidance is folded in"):
        parse_config("euler/uniform/8/model=student/cfg=2")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
def test_quality_part_scores_each_config_and_draws_the_grid(cli, tmp_path):
    r = cli("train", "--config", "demo", "--data.source=fashion-mnist", "--train.steps=2",
            "--train.global_batch_size=8", "--train.sample_every=0", "--checkpoint.full_every=0",
            "--train.time_budget_s=0", f"--run.root={tmp_path}", "--run.name=fm")
    assert r.returncode == 0, r.stderr
    out, grid = tmp_path / "q.json", tmp_path / "grid.png"
    r = cli("bench", "sample", "--no-speed", "--quality", "--run", tmp_path / "fm", "--samples", "20",
            "--references", "30", "--configs", "euler/uniform/2,dpm++2m/logsnr/2/guidance=linear,"
            "euler/uniform/2/interval=0.6-1,euler/uniform/2/model=student", "--distill-s", "1", "--grid", grid,
            "--device", "cpu", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr
    quality = json.loads(out.read_text())["quality"]
    rows = quality["rows"]
    assert [row["config"] for row in rows] == ["euler/uniform/2", "dpm++2m/logsnr/2/guidance=linear",
                                               "euler/uniform/2/interval=0.6-1", "euler/uniform/2/model=student"]
    assert all(row["fid"] > 0 and row["nfe"] == 2 for row in rows) and rows[1]["guidance_schedule"] == "linear"
    # guided: 2 passes per evaluation of t = 1 and 0.5; the linear schedule has no guidance at t = 1 and the
    # interval none at 0.5: 3;
    # the student, its guidance folded in: one pass per evaluation
    assert [row["passes_per_image"] for row in rows] == [4, 3, 3, 2]
    assert quality["student"]["folded_guidance"]["cfg_scale"] == rows[0]["cfg_scale"] and "student:" in r.stdout
    assert grid.stat().st_size > 1000
