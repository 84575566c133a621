"""Preemption and non-finite steps on real runs: SIGTERM to one of two ranks stops both at one step with
a full checkpoint and exit 0; NaN steps are skipped, and after N in a row the run rolls back."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from genfoundry import checkpoint, config, metrics
from genfoundry.trainer import Trainer

from multiproc import free_port, rank_env as _rank_env

TINY = {"train.global_batch_size": 8, "train.val_batch_size": 16, "train.log_every": 1, "train.val_every": 1000,
        "train.sample_every": 0, "train.warmup_steps": 1, "sample.steps": 1, "sample.per_class": 1,
        "sample.sampler": "euler", "run.threads": 1}


@pytest.mark.timeout(240)
def test_sigterm_to_one_rank_saves_the_same_step_on_both_and_exits_0(tmp_path):
    args = [sys.executable, "-m", "genfoundry", "train", "--config", "demo", f"--run.root={tmp_path}",
            "--run.name=pre", "--train.steps=100000", "--checkpoint.full_every=0", "--checkpoint.grace_s=60",
            *[f"--{k}={v}" for k, v in TINY.items()]]
    port = free_port()
    procs = [subprocess.Popen(args, env=_rank_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        log = tmp_path / "pre" / "metrics.jsonl"
        deadline = time.monotonic() + 150
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # as a scheduler that reaches one node first
        signalled = time.monotonic()
        outs = [p.communicate(timeout=60) for p in procs]
        took = time.monotonic() - signalled
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert took < 30, took
    saved = [p for p in (tmp_path / "pre" / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].name.startswith("full-"), saved
    step = checkpoint.verify(saved[0])["step"]
    assert f"SIGTERM: saved the full state of step {step}" in outs[0][0], outs[0]
    assert not (tmp_path / "pre" / "final").exists()


class PoisonedTrainer(Trainer):
    """Training whose loss is NaN at the given steps, as a bad batch or an unstable update makes it."""

    poisoned: set[int] = set()

    def train_step(self):
        loss = self.objective.loss
        if self.step in self.poisoned:
            self.objective.loss = lambda *a, **k: loss(*a, **k) * float("nan")
        try:
            super().train_step()
        finally:
            self.objective.loss = loss


@pytest.mark.timeout(180)
def test_nonfinite_steps_are_skipped_then_the_run_rolls_back_and_goes_on(tmp_path):
    cfg = config.load("demo", {**TINY, "run.root": str(tmp_path), "train.steps": 10, "checkpoint.full_every": 4,
                               "checkpoint.nonfinite_rollback": 3, "train.precision": "bf16"})
    lines = []
    trainer = PoisonedTrainer(cfg, lambda *a, **k: lines.append(" ".join(map(str, a))))
    trainer.poisoned = {5, 6, 7}
    trainer.train()
    rows = metrics.read_jsonl(tmp_path / "demo" / "metrics.jsonl", all_rows=True)
    skipped = {r["step"] for r in rows if r.get("nonfinite_steps")}
    assert skipped == {6, 7, 8}, skipped  # a row at step s reports the step that ended there
    assert [(r["step"], r["to_step"]) for r in rows if r.get("event") == "rollback"] == [(7, 4)], rows
    assert any("rolled the weights, optimizer and EMA back to step 4" in line for line in lines), lines
    last = [r for r in rows if "event" not in r][-1]
    assert last["step"] == 10 and math.isfinite(last["loss"]) and last["rollbacks"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())


class DeviceSkippingTrainer(PoisonedTrainer):
    """The accelerator's path on the CPU: the fused AdamW skips non-finite steps itself, and the host reads
    the steps' flags only at reports and before checkpoints."""

    DEVICE_SKIPS = ("cuda", "xpu", "cpu")


def run_with_late_skips(tmp_path, overrides: dict | None = None, data=None) -> None:
    """Steps 6..8 end non-finite; the host reads their flags at the checkpoint of step 8 and rolls back."""
    cfg = config.load("demo", {**TINY, "run.root": str(tmp_path), "train.steps": 15, "train.log_every": 5,
                               "checkpoint.full_every": 4, "checkpoint.nonfinite_rollback": 3, **(overrides or {})})
    lines = []
    trainer = DeviceSkippingTrainer(cfg, lambda *a, **k: lines.append(" ".join(map(str, a))), data=data)
    assert trainer.device_skips and trainer.optimizer.defaults["fused"]
    trainer.poisoned = {5, 6, 7}
    trainer.train()
    rows = metrics.read_jsonl(tmp_path / "demo" / "metrics.jsonl", all_rows=True)
    steps = {r["step"]: r for r in rows if "event" not in r}
    assert steps[10]["nonfinite_steps"] == pytest.approx(3 / 5), steps[10]  # counted in the row of step 10
    assert [(r["step"], r["to_step"]) for r in rows if r.get("event") == "rollback"] == [(8, 4)], rows
    assert any("rolled the weights, optimizer and EMA back to step 4" in line for line in lines), lines
    assert steps[15]["rollbacks"] == 1 and math.isfinite(steps[15]["loss"])  # step 10's mean holds NaN losses
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.ema.parameters())


@pytest.mark.timeout(180)
def test_steps_skipped_by_the_fused_optimizer_are_read_late_and_still_roll_back(tmp_path):
    run_with_late_skips(tmp_path)
