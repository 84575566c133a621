"""Observability end to end: a real run (with a restart, checkpoints, samples and an FID) writes
metrics.jsonl, TensorBoard event files and report.html; a curation joins it; headless Chromium draws
every chart without a JavaScript error."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from genfoundry import config, metrics
from genfoundry.api import build_report, evaluate, train
from genfoundry.report.data import ReportError, chart_specs, goodput, pack_columns, unpack_columns

from conftest import ROOT
from test_train import tiny_cfg

QUIET = lambda *a, **k: None  # noqa: E731
RUN = {"run.name": "a", "train.log_every": 1, "train.val_every": 4, "train.sample_every": 4,
       "train.report_every": 4, "checkpoint.full_every": 4, "eval.num_samples": 4, "eval.max_reference_images": 16}


def test_the_report_does_not_import_torch():
    code = ("import sys, genfoundry.report, genfoundry.report.data, genfoundry.report.browser; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_columns_travel_whole_and_exactly():
    rng = np.random.default_rng(0)
    columns = [np.arange(1000.0), rng.normal(size=1000), np.where(rng.random(1000) < 0.9, np.nan, 1.5)]
    back = unpack_columns(pack_columns(columns), 3)
    for original, got in zip(columns, back):
        assert np.array_equal(np.asarray(original, np.float32), got, equal_nan=True)


def test_charts_group_a_metric_with_its_rank_extremes_and_validation_with_loss():
    specs = {s["id"]: s for s in chart_specs({"loss", "val_loss", "val_loss_ema", "data/wait_fraction",
                                              "data/wait_fraction.min", "data/wait_fraction.max", "lr"})}
    assert [s["metric"] for s in specs["chart-loss"]["series"]] == ["loss", "val_loss", "val_loss_ema"]
    wait = specs["chart-data-wait-fraction"]["series"]
    assert [(s["metric"], s["role"]) for s in wait] == [("data/wait_fraction", "main"),
                                                        ("data/wait_fraction.max", "band"),
                                                        ("data/wait_fraction.min", "band")]
    assert set(specs) == {"chart-loss", "chart-data-wait-fraction", "chart-lr"}


def test_goodput_counts_redone_steps_and_downtime():
    batch = 10
    rows = [{"step": 0, "time": 0.0},
            {"step": 10, "time": 10.0, "images_per_s": 10.0},   # 10 s of steps 1-10, kept
            {"step": 20, "time": 20.0, "images_per_s": 10.0},   # steps 11-20, abandoned by the restart below
            {"event": "resume", "step": 10, "time": 50.0},     # down from 20 s to 50 s
            {"step": 20, "time": 60.0, "images_per_s": 10.0}]   # steps 11-20 again, kept
    g = goodput(rows, metrics.kept_rows(rows), batch)
    assert g["wall_s"] == 60.0 and g["training_s"] == 20.0 and g["redone_s"] == 10.0 and g["down_s"] == 30.0
    assert g["goodput"] == pytest.approx(1 / 3)
    rows.append({"event": "eval", "step": 20, "time": 86400.0, "fid": 3.0})  # scored a day later
    assert goodput(rows, metrics.kept_rows(rows), batch) == g
    assert goodput(rows, metrics.kept_rows(rows), 0)["goodput"] is None  # no batch known: no figure


def test_a_torn_last_line_is_left_out_and_a_bad_line_elsewhere_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert [r["step"] for r in metrics.read_jsonl(path)] == [0, 1]
    sink = metrics.JsonlSink(path)  # a resumed run first cuts the torn line off, then appends whole rows
    sink.write(2, {"loss": 0.8})
    assert [r["step"] for r in metrics.read_jsonl(path)] == [0, 1, 2]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(metrics.MetricsError, match="line 2"):
        metrics.read_jsonl(path)
    with pytest.raises(ReportError, match="line 2"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        build_report(tmp_path / "..")


def _curation(tmp_path):
    from skimage import data as photos

    from genfoundry.curation import curate
    from genfoundry.curation.config import load_curate

    src = tmp_path / "raw"
    src.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(photos, name)()).save(src / f"{name}.jpg")
    Image.fromarray(photos.camera()[:40, :40]).save(src / "small.png")  # below basic.min_side
    Image.new("RGB", (300, 300), (128, 128, 128)).save(src / "grey.png")  # blank
    cfg = load_curate(None, {"run.stages": "basic,semantic", "semantic.filters": "blank", "semantic.dedup": "false",
                             "basic.min_side": "256", "basic.min_bytes": "0", "run.workers": "1", "run.device": "cpu"})
    curate([str(src)], str(tmp_path / "curated"), cfg, progress=False)
    return tmp_path / "curated"


@pytest.mark.timeout(240)
def test_a_run_with_a_restart_reports_everywhere_and_every_chart_draws(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from genfoundry.report.browser import BrowserError, find_browser, open_page

    train(tiny_cfg(tmp_path, **RUN, **{"train.steps": 8}), QUIET)
    cfg = tiny_cfg(tmp_path, **RUN, **{"train.steps": 12})
    train(cfg, QUIET)  # resumes from step 8
    run = tmp_path / "a"
    evaluate(run, print_fn=QUIET)  # an FID of the final weights, at step 12

    every = metrics.read_jsonl(run / "metrics.jsonl", all_rows=True)
    rows = metrics.kept_rows(every)
    assert [r["step"] for r in rows] == list(range(13))
    last = rows[-1]
    for key in ("loss", "grad_norm", "lr", "images_per_s", "data/wait_fraction", "memory_allocated_gb",
                "peak_memory_gb", "val_loss", "val_loss_ema"):
        assert isinstance(last.get(key), float), key
    assert last["restarts"] == 1 and last["rollbacks"] == 0
    events = [r for r in every if "event" in r]
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [4, 8, 12] and all(e["durable_s"] > 0 for e in checkpoints)
    assert any("checkpoint/stall_s" in r for r in rows)
    fid = [e for e in events if e["event"] == "eval"]
    assert len(fid) == 1 and fid[0]["step"] == 12 and fid[0]["fid"] > 0

    tb = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in tb.Scalars("loss")][-3:] == [10, 11, 12]
    assert {e.step for e in tb.Images("samples")} >= {4, 8, 12}
    assert tb.Scalars("eval/fid")[0].value == pytest.approx(fid[0]["fid"], rel=1e-5)

    assert (run / "report.html").is_file()  # rebuilt during and at the end of training
    other = tmp_path / "b"
    shutil.copytree(run, other)
    page = build_report([run, other], tmp_path / "both.html", curation=_curation(tmp_path))

    try:
        find_browser()
    except BrowserError as e:
        pytest.skip(f"headless Chromium unavailable: {e}")
    shot = tmp_path / "report.png"
    seen = open_page(page, screenshot=shot)
    assert seen["console_errors"] == [] and seen["status"]["errors"] == []
    charts = {c["id"]: c for c in seen["status"]["charts"]}
    assert {"chart-timeline", "chart-loss", "chart-grad-norm", "chart-lr", "chart-fid", "hist-score-blank"} <= set(charts)
    assert all(c["drawn"] and c["points"] > 0 for c in charts.values()), charts
    assert charts["chart-loss"]["series"] == 2 * 4  # two runs x (loss raw and smoothed, val_loss, val_loss_ema)
    assert charts["chart-loss"]["points"] == 2 * (12 + 4 + 4)  # every logged value: 12 losses, 4 validations each
    assert shot.stat().st_size > 50_000
    data = json.loads(page.read_text().split("id=report-data>", 1)[1].split("</script>", 1)[0])
    assert data["runs"][0]["samples"]["total"] == 4  # steps 4, 8, 12 and final
    assert {h["column"] for h in data["curation"]["histograms"]} == {"score_blank"}
    assert set(data["curation"]["examples"]) == {"small", "blank"}


def test_tensorboard_can_be_switched_off(tmp_path):
    train(tiny_cfg(tmp_path, **{"run.name": "quiet", "train.steps": 2, "train.tensorboard": False,
                                "train.report_every": 0}), QUIET)
    assert not list((tmp_path / "quiet").glob("events.out.tfevents.*"))
    assert (tmp_path / "quiet" / "report.html").is_file()  # the end of a run always writes it
    assert config.load("demo").train.report_every > 0


def _page_rows(page) -> int:
    return json.loads(page.read_text().split("id=report-data>", 1)[1].split("</script>", 1)[0])["runs"][0]["rows"]


@pytest.mark.timeout(120)
def test_a_live_run_rebuilds_its_report_while_it_trains(tmp_path):
    args = [sys.executable, "-m", "genfoundry", "train", "--config", "demo", f"--run.root={tmp_path}",
            "--run.name=live", "--train.steps=1000", "--train.log_every=1", "--train.report_every=3",
            "--train.val_every=1000", "--train.sample_every=0", "--checkpoint.full_every=0", "--run.threads=1",
            "--train.global_batch_size=8", "--train.val_batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    page, seen = tmp_path / "live" / "report.html", []
    try:
        deadline = time.monotonic() + 90
        while len(set(seen)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            if page.exists():
                seen.append(_page_rows(page))  # replaced whole (atomic rename): never half a page
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    assert len(set(seen)) >= 2 and seen == sorted(seen), seen  # rebuilt, newer steps each time
