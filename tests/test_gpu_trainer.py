"""The trainer's accelerator-only paths: steps skipped on the device by the fused optimizer (the host
reads the flags at reports and before checkpoints), the whole loss compiled and replayed as CUDA
graphs, and a training-time budget. They skip, with the reason, on machines without CUDA."""

import pytest
import torch

from genfoundry import config, metrics
from genfoundry.data.build import synthetic_data
from genfoundry.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = {"train.global_batch_size": 8, "train.val_batch_size": 16, "train.log_every": 1, "train.val_every": 1000,
        "train.sample_every": 0, "train.warmup_steps": 1, "train.report_every": 0, "train.tensorboard": False,
        "run.device": "cuda"}


def _data():
    """Random 16-px images of four classes, held like a named dataset (no dataset package needed)."""
    return synthetic_data(16, 3, 4, 512, TINY["train.global_batch_size"], 0, torch.device("cuda"))


@pytest.mark.timeout(300)
def test_nonfinite_steps_are_skipped_on_the_device_and_the_run_rolls_back(tmp_path):
    from test_fault_tolerance import run_with_late_skips

    run_with_late_skips(tmp_path, {"run.device": "cuda", "train.precision": "bf16"}, _data())


@pytest.mark.timeout(400)
def test_the_whole_loss_compiled_as_cuda_graphs_trains_like_eager(tmp_path):
    losses = {}
    for name, extra in (("eager", {}), ("graphs", {"parallel.compile": True, "parallel.compile_scope": "loss",
                                                  "parallel.cuda_graphs": True})):
        cfg = config.load("demo", {**TINY, **extra, "run.root": str(tmp_path), "run.name": name,
                                   "train.steps": 12, "train.precision": "fp32", "checkpoint.full_every": 0})
        Trainer(cfg, lambda *a, **k: None, data=_data()).train()
        losses[name] = [r["loss"] for r in metrics.read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert len(losses["graphs"]) == len(losses["eager"]) == 12
    for eager, graphs in zip(losses["eager"], losses["graphs"]):
        assert graphs == pytest.approx(eager, rel=2e-2), losses


@pytest.mark.timeout(300)
def test_a_time_budget_ends_the_run_and_the_schedule_decays_to_its_end(tmp_path):
    cfg = config.load("demo", {**TINY, "run.root": str(tmp_path), "train.steps": 10**6, "train.log_every": 20,
                               "train.time_budget_s": 6.0, "train.lr_schedule": "cosine",
                               "checkpoint.full_every": 0})
    trainer = Trainer(cfg, lambda *a, **k: None, data=_data())
    trainer.train()
    rows = [r for r in metrics.read_jsonl(tmp_path / "demo" / "metrics.jsonl") if "event" not in r]
    last = rows[-1]
    assert last["step"] == trainer.step == trainer.total_steps < 10**6
    assert 4.5 < last["train_time_s"] < 7.5, last
    assert last["lr"] < 0.05 * cfg.train.lr, last  # cosine: near 0 at the budget's end
