"""What a user expects from training and sampling their own images: resume rows, EMA against raw
weights, the config keys in --help, automatic precision, load_trained from Python, one class at a time.

Every run here is the real trainer on a folder of 16 px images, a few steps of DiT-T/4."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from genfoundry import api, checkpoint, config, metrics
from genfoundry.cli import main
from genfoundry.trainer import Trainer
from genfoundry.accel import resolve_precision

from conftest import ROOT

QUIET = lambda *a, **k: None  # noqa: E731
CLASSES = ("3", "7")


def write_folder(root):
    """Two classes of 16 px images, a bright vertical bar ('3') or horizontal bar ('7'), 8 of each."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(8):
            image = rng.integers(0, 40, (16, 16), dtype=np.uint8)
            where = (slice(None), slice(6 + i % 3, 10 + i % 3)) if c == 0 else (slice(6 + i % 3, 10 + i % 3), slice(None))
            image[where] = 220
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def tiny_cfg(root, folder, **overrides):
    return config.load(None, {
        "data.source": str(folder), "data.resolution": 16, "data.channels": 1, "model.preset": "DiT-T/4",
        "train.global_batch_size": 4, "train.val_batch_size": 4, "train.steps": 2, "train.lr": 2e-3,
        "train.warmup_steps": 0, "train.log_every": 1, "train.val_every": 1, "train.sample_every": 0,
        "checkpoint.full_every": 0, "sample.steps": 1, "sample.per_class": 1, "run.threads": 1,
        "run.root": str(root), "run.device": "cpu", **overrides})  # the CPU's figures, on any machine


@pytest.fixture(scope="module")
def stale_ema_run(tmp_path_factory, folder):
    """runs/demo, whose EMA barely left its initialisation (a long half-life without ramp-up): its raw
    weights validate far better, as after a short run with a long half-life."""
    root = tmp_path_factory.mktemp("work")
    lines = []
    api.train(tiny_cfg(root / "runs", folder, **{"run.name": "demo", "train.steps": 4, "train.ema_rampup": 0,
                                                 "train.ema_halflife_kimg": 1000}), lambda *a, **k: lines.append(" ".join(map(str, a))))
    return root / "runs" / "demo", "\n".join(lines)


# ---- 1. resume rows in metrics.jsonl -----------------------------------------------------------


def test_a_resume_is_marked_and_the_reader_keeps_the_rows_of_the_run_that_went_on(tmp_path, folder):
    cfg = tiny_cfg(tmp_path, folder, **{"train.steps": 4, "checkpoint.full_every": 2})
    api.train(cfg, QUIET)
    run = tmp_path / "run"
    # As if killed after logging step 4 but before its checkpoint: the rerun goes on from step 2.
    shutil.rmtree(run / "checkpoints" / "full-000000004")
    api.train(cfg, QUIET)
    every = metrics.read_jsonl(run / "metrics.jsonl", all_rows=True)
    # each save once durable: 2 and 4, then 4 again by the run that went on
    assert [r["step"] for r in every if r.get("event") == "checkpoint"] == [2, 4, 4]
    written = [r for r in every if r.get("event") != "checkpoint"]
    assert [r.get("event", r["step"]) for r in written] == [0, 1, 2, 3, 4, "resume", 3, 4]
    marker = written[5]
    assert marker["step"] == 2 and marker["images_seen"] == 8 and marker["precision"] == "fp32"
    rows = metrics.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3] == written[6] and rows[4] == written[7]


def test_the_reader_drops_rows_a_resume_left_behind(tmp_path):
    """Rows past the resume step belong to the abandoned attempt, even where the run that went on logs
    other steps; a file from before resume markers keeps the newest row of each step."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in (0, 2, 4, 6)] + [{"event": "resume", "step": 2}]
    rows += [{"step": s, "loss": 2.0} for s in (3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(path)] == [(0, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in ((0, 1), (2, 1), (2, 3))))
    assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(path)] == [(0, 1), (2, 3)]


# ---- 2. EMA or raw weights ---------------------------------------------------------------------


def test_a_stale_ema_is_reported_and_auto_samples_the_raw_weights(stale_ema_run, tmp_path, capsys):
    run, printed = stale_ema_run
    meta = json.loads((run / "final" / "model.json").read_text())
    assert meta["val_loss_ema"] > 1.1 * meta["val_loss"] > 0
    assert "--weights model" in printed
    assert main(["sample", str(run), "--num-images", "2", "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"weights auto: model .*validation loss", out), out
    assert json.loads((tmp_path / "s" / "sampling.json").read_text())["weights"] == "model"
    model, meta = api.load_trained(run, print_fn=QUIET)
    assert meta["weights"] == "model"
    assert api.load_trained(run, "ema", print_fn=QUIET)[1]["weights"] == "ema"


def test_an_ema_no_worse_than_the_raw_weights_is_kept_without_a_warning(tmp_path, folder):
    lines = []
    api.train(tiny_cfg(tmp_path, folder, **{"train.ema_halflife_kimg": 0}), lambda *a, **k: lines.append(str(a)))
    meta = json.loads((tmp_path / "run" / "final" / "model.json").read_text())
    assert meta["val_loss_ema"] == meta["val_loss"]  # a half-life of 0 images: the EMA is the raw weights
    assert not any("--weights" in line for line in lines)
    assert api.load_trained(tmp_path / "run", print_fn=QUIET)[1]["weights"] == "ema"


def test_rerunning_a_finished_run_still_records_its_validation_losses(tmp_path, folder):
    cfg = tiny_cfg(tmp_path, folder, **{"checkpoint.full_every": 2})
    api.train(cfg, QUIET)
    first = json.loads((tmp_path / "run" / "final" / "model.json").read_text())
    api.train(cfg, QUIET)  # resumes at the end: no report runs, the final weights are written again
    again = json.loads((tmp_path / "run" / "final" / "model.json").read_text())
    assert again["val_loss"] == first["val_loss"] and again["val_loss_ema"] == first["val_loss_ema"]


def test_the_default_ema_rampup_suits_a_short_run(tmp_path, folder):
    """Measured on MNIST (docs/training.md): 200 steps of the mnist recipe left an EMA whose half-life
    was capped at 0.5 x images seen at 2.2 x the raw weights' validation loss; at 0.05 x, 0.98 x."""
    trainer = Trainer(tiny_cfg(tmp_path, folder, **{"train.ema_halflife_kimg": 50}), QUIET)
    trainer.images_seen = 200 * 256
    assert trainer.ema_halflife() == pytest.approx(0.05 * 200 * 256)
    trainer.images_seen = 20000 * 256  # a long run: the configured half-life
    assert trainer.ema_halflife() == 50_000


# ---- 3. config keys in --help ------------------------------------------------------------------


def test_every_config_field_has_a_description():
    docs = config.field_docs()
    cfg = config.Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert docs[section.name].get(f.name), f"{section.name}.{f.name} has no comment in config.py"
    # A comment continued on the next line is part of the description.
    assert "searched on an accelerator" in docs["train"]["micro_batch_size"]


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help_lists_every_config_key_with_its_default_and_description(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    docs = config.field_docs()
    for section, values in config.to_dict(config.Config()).items():
        assert f"[{section}]" in out
        for key, value in values.items():
            shown = f"{key} = {json.dumps(value) if isinstance(value, str) else ''}"
            line = next((line for line in out.splitlines() if line.strip().startswith(shown)), None)
            assert line is not None, f"{section}.{key} is not listed"
            assert docs[section][key][:30] in " ".join(out.split()), f"{section}.{key}'s description is missing"


# ---- 4. automatic precision --------------------------------------------------------------------


def test_precision_defaults_to_auto_and_resolves_to_fp32_on_a_cpu():
    assert config.Config().train.precision == "auto"
    for recipe in ("mnist", "fashion-mnist"):
        assert config.load(recipe).train.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_precision_is_printed_recorded_and_kept_on_resume(tmp_path, folder):
    lines = []
    cfg = tiny_cfg(tmp_path, folder, **{"checkpoint.full_every": 2})
    api.train(cfg, lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("precision fp32 (train.precision=auto)" in line for line in lines), lines
    directory = tmp_path / "run" / "checkpoints"
    state = checkpoint.read_state(directory / "full-000000002" / "state.pt")
    assert state["precision"] == "fp32"
    # As if the run had started on a GPU that resolved auto to bf16, and goes on here.
    state["precision"] = "bf16"
    manager = checkpoint.CheckpointManager(directory, torch.device("cpu"))
    manager.save("full", 2, {k: v for k, v in state.items() if k != "format_version"})
    manager.close()
    lines.clear()
    api.train(config.apply_overrides(cfg, {"train.steps": 3}), lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("precision bf16" in line for line in lines), lines
    assert checkpoint.read_state(directory / "full-000000003" / "state.pt")["precision"] == "bf16"


# ---- 5. load_trained from Python, as docs/training.md shows it ----------------------------------


def test_the_load_trained_example_in_the_docs_runs(stale_ema_run, monkeypatch):
    run, _ = stale_ema_run
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split("## Using the trained model from Python", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(run.parent.parent)  # the example names runs/demo
    exec(compile(example, "docs/training.md", "exec"), {})
    grid = np.asarray(Image.open(run.parent.parent / "threes-and-sevens.png"))
    assert grid.shape[0] > 2 * 16 and grid.std() > 0


# ---- 6. sampling chosen classes ----------------------------------------------------------------


def test_sample_one_class_by_name(stale_ema_run, tmp_path, capsys):
    run, _ = stale_ema_run
    out = tmp_path / "sevens"
    assert main(["sample", str(run), "--class", "7", "--num-images", "3", "--steps", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000-7.png", "000001-7.png", "000002-7.png"]
    assert json.loads((out / "sampling.json").read_text())["classes"] == ["7"]
    info = api.sample(run, tmp_path / "both", steps=1, classes=["7", "3"], print_fn=QUIET)
    assert info["num_images"] == 2 and info["classes"] == ["7", "3"]  # sample.per_class of each
    assert sorted(p.name for p in (tmp_path / "both").glob("0*.png")) == ["000000-7.png", "000001-3.png"]


def test_an_unknown_class_is_one_line_naming_the_known_ones(stale_ema_run, tmp_path, capsys):
    run, _ = stale_ema_run
    assert main(["sample", str(run), "--class", "cat", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "'cat'" in err and "3, 7" in err and "--class" in err, err
