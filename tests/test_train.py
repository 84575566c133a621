import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from genfoundry import checkpoint, config, metrics
from genfoundry.api import train
from genfoundry.diffusion import FlowMatching
from genfoundry.models import build_model
from genfoundry.sources import load_images
from genfoundry.trainer import Trainer

from conftest import ROOT, run_cli

TINY = {"train.global_batch_size": 8, "train.val_batch_size": 16, "train.log_every": 2, "train.val_every": 4,
        "train.sample_every": 0, "train.warmup_steps": 2, "sample.steps": 2, "sample.per_class": 1,
        "run.threads": 1}


def tiny_cfg(tmp_path, **overrides):
    return config.load("demo", {**TINY, "run.root": str(tmp_path), **overrides})


def whole_and_split(tmp_path, common: dict) -> None:
    """Runs 'whole' for 6 steps at once and 'split' for 3, then again to 6 (a restart from the checkpoint)."""
    quiet = lambda *a, **k: None  # noqa: E731
    common = {"checkpoint.full_every": 3, **common}
    train(tiny_cfg(tmp_path, **common, **{"train.steps": 6, "run.name": "whole"}), quiet)
    train(tiny_cfg(tmp_path, **common, **{"train.steps": 3, "run.name": "split"}), quiet)
    train(tiny_cfg(tmp_path, **common, **{"train.steps": 6, "run.name": "split"}), quiet)


def assert_same_final_weights(run_a, run_b) -> None:
    for name in ("model", "ema"):
        a = load_file(str(run_a / "final" / f"{name}.safetensors"))
        b = load_file(str(run_b / "final" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.timeout(120)
def test_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    images = load_images("mnist", "test")
    x = torch.from_numpy(images.images[:32]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(images.labels[:32])
    model = build_model("DiT-T/4", 28, 1, 10)
    objective = FlowMatching(class_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    t, eps, _ = objective.draw(x, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = objective.loss(model, x, y, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.timeout(180)
def test_run_writes_metrics_samples_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.steps": 6, "train.sample_every": 3, "checkpoint.full_every": 3,
                                "checkpoint.snapshot_every": 2, "checkpoint.keep_snapshots": 2,
                                "checkpoint.remote": f"file://{tmp_path}/remote", "checkpoint.keep_remote": 1})
    last = train(cfg, print_fn=lambda *a, **k: None)
    run = tmp_path / "demo"
    rows = metrics.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert all(r["format_version"] == 1 for r in rows)
    assert "val_loss" in rows[0] and "val_loss_ema" in rows[-1] and "loss" in rows[-1]
    assert rows[-1]["images_seen"] == 48 and last["images_seen"] == 48
    assert (run / "samples" / "grid-0000003.png").exists() and (run / "samples" / "final.png").exists()
    assert set(load_file(str(run / "final" / "ema.safetensors"))) == set(Trainer(cfg).model.state_dict())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["full-000000003", "full-000000006",
                                                                       "snapshot-000000004", "snapshot-000000006"]
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == ["full-000000006", "snapshot-000000006"]
    snapshot = load_file(str(run / "checkpoints" / "snapshot-000000006" / "ema.safetensors"))
    final = load_file(str(run / "final" / "ema.safetensors"))
    assert all(torch.equal(snapshot[k], final[k]) for k in final)
    assert config.load(str(run / "config.toml")) == cfg


@pytest.mark.timeout(180)
def test_validation_loss_is_repeatable(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path))
    assert trainer.validate() == trainer.validate()


@pytest.mark.timeout(240)
def test_resume_is_bit_exact(tmp_path):
    """6 steps in one go equal 3 steps, a new process-like restart from the checkpoint, then 3 more."""
    whole_and_split(tmp_path, {"train.precision": "bf16", "data.hflip": "true"})
    assert_same_final_weights(tmp_path / "whole", tmp_path / "split")
    whole = checkpoint.read_state(tmp_path / "whole" / "checkpoints" / "full-000000006" / "state.pt")
    split = checkpoint.read_state(tmp_path / "split" / "checkpoints" / "full-000000006" / "state.pt")
    assert whole["data"] == split["data"]


@pytest.mark.timeout(300)
def test_kill_9_then_rerun_matches_uninterrupted_run(tmp_path):
    """A real SIGKILL mid-run; the same command again resumes and ends bit-identical."""
    args = ["train", "--config", "demo", *[f"--{k}={v}" for k, v in TINY.items()], "--train.steps=30",
            "--checkpoint.full_every=4", f"--run.root={tmp_path}"]
    assert run_cli(*args, "--run.name=whole").returncode == 0
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "genfoundry", *args, "--run.name=killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name.startswith("full-") for p in ckpts.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    r = run_cli(*args, "--run.name=killed")
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stdout
    assert_same_final_weights(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.timeout(120)
def test_changed_config_in_existing_run_dir_is_refused(tmp_path):
    train(tiny_cfg(tmp_path, **{"train.steps": 1}), lambda *a, **k: None)
    with pytest.raises(config.ConfigError, match="different train.lr; to continue it pass --train.lr=0.002"):
        train(tiny_cfg(tmp_path, **{"train.steps": 2, "train.lr": 1e-5}), lambda *a, **k: None)


@pytest.mark.timeout(120)
def test_fp16_loss_scaler_skips_overflow_and_recovers(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, **{"train.precision": "fp16", "train.loss_scale_init": 2.0**40}))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()  # 2^40 overflows fp16 gradients: the step is skipped and the scale halves
    assert trainer.scaler.scale == 2.0**39
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.scaler.scale = 2.0**10
    trainer.train_step()
    assert trainer.scaler.scale == 2.0**10
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.timeout(300)
def test_training_on_shards_resumes_exactly(tmp_path):
    """The trainer on a packed shard set through the DataPipeline (2 decode workers), killed between
    checkpoints and resumed, ends bit-identical to an uninterrupted run."""
    from genfoundry.shards import pack

    shards = tmp_path / "shards"
    pack("mnist:test", str(shards), samples_per_shard=2500, progress=False)
    whole_and_split(tmp_path, {"data.source": str(shards), "data.workers": 2})
    assert_same_final_weights(tmp_path / "whole", tmp_path / "split")
    meta = json.loads((tmp_path / "whole" / "final" / "model.json").read_text())
    assert meta["arch"]["image_size"] == 28 and meta["arch"]["in_channels"] == 1 and meta["arch"]["num_classes"] == 10


@pytest.mark.parametrize("sampling", ["uniform", "logit-normal"])
def test_validation_times_follow_the_configured_time_sampling(tmp_path, sampling):
    """The fixed validation batch draws its times as training does: uniform puts ~10% below 0.1, where
    logit-normal puts ~1.4%."""
    cfg = tiny_cfg(tmp_path, **{"diffusion.time_sampling": sampling, "train.val_batch_size": 512})
    t = Trainer(cfg, lambda *a, **k: None).val_batch[2]
    low = (t < 0.1).float().mean().item()
    assert (0.06 < low < 0.14) if sampling == "uniform" else low < 0.04, low
