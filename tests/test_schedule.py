"""Learning-rate schedules, the training-time budget, loss weightings and the guidance interval."""

import math

import pytest
import torch

from genfoundry import config, metrics
from genfoundry.diffusion import LOSS_WEIGHTINGS, FlowMatching
from genfoundry.sampling import solve
from genfoundry.errors import ConfigError
from genfoundry.models import build_model
from genfoundry.trainer import Trainer
from genfoundry.trainer.schedule import budgeted_total, lr_factor, peak_lr


def test_warmup_then_constant_cosine_and_wsd():
    assert [lr_factor("constant", s, 100, 4) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor("cosine", s, 100, 10, min_ratio=0.1) for s in range(100)]
    assert cos[10] == pytest.approx(1.0) and cos[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))  # never rises after warm-up
    assert cos[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    wsd = [lr_factor("wsd", s, 100, 10, decay_fraction=0.2) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70  # stable until the last 20%
    assert wsd[80] == pytest.approx(1 - 1 / 20) and wsd[99] == 0.0
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))
    with pytest.raises(ValueError):
        lr_factor("step", 5, 10, 0)


def test_batch_scaling_of_the_learning_rate():
    tc = config.load(None, {"train.lr": 1e-3, "train.global_batch_size": 1024, "train.lr_scaling": "sqrt"}).train
    assert peak_lr(tc) == pytest.approx(2e-3)
    tc.lr_scaling = "linear"
    assert peak_lr(tc) == pytest.approx(4e-3)
    tc.lr_scaling = "none"
    assert peak_lr(tc) == 1e-3
    with pytest.raises(ConfigError, match="lr_scaling"):
        config.load(None, {"train.lr_scaling": "cubic"})
    with pytest.raises(ConfigError, match="lr_schedule"):
        config.load(None, {"train.lr_schedule": "linear"})


def test_the_budget_sets_the_steps_from_the_last_interval():
    assert budgeted_total(50, 1000, 10.0, 0.0, 50, 10.0) == 1000  # no budget: the configured steps
    assert budgeted_total(50, 1000, 10.0, 30.0, 50, 10.0) == 150  # 20 s left at 5 steps/s
    assert budgeted_total(50, 120, 10.0, 30.0, 50, 10.0) == 120  # never past train.steps
    assert budgeted_total(50, 1000, 30.5, 30.0, 50, 10.0) == 50  # spent: stop now
    assert budgeted_total(50, 1000, 10.0, 30.0, 0, 0.0) == 1000  # no rate yet: only the clock stops it


@pytest.mark.timeout(180)
def test_a_time_budget_ends_a_cpu_run_with_its_schedule_decayed(tmp_path):
    cfg = config.load("demo", {"run.root": str(tmp_path), "train.steps": 10**6, "train.time_budget_s": 4.0,
                               "train.lr_schedule": "cosine", "train.global_batch_size": 8, "train.log_every": 5,
                               "train.val_every": 10**6, "train.val_batch_size": 16, "train.sample_every": 0,
                               "train.report_every": 0, "train.tensorboard": False, "train.warmup_steps": 2,
                               "checkpoint.full_every": 0, "run.threads": 1})
    trainer = Trainer(cfg, lambda *a, **k: None)
    trainer.train()
    rows = [r for r in metrics.read_jsonl(tmp_path / "demo" / "metrics.jsonl") if "event" not in r]
    last = rows[-1]
    assert last["step"] == trainer.step == trainer.total_steps < 10**6
    assert 3.0 <= last["train_time_s"] < 7.0, last  # it may stop at its planned step just before the clock
    assert last["lr"] < 0.05 * cfg.train.lr, last
    assert rows[len(rows) // 2]["total_steps"] > 0


def test_loss_weightings_follow_their_formulas():
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    snr = ((1 - t) / t) ** 2
    w = LOSS_WEIGHTINGS["min-snr"](t, 5.0, 0.5)
    assert torch.allclose(w, t * t * torch.minimum(snr, torch.tensor(5.0)))
    sigma = t / (1 - t)
    edm = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda on the denoised image; the velocity's error is /t
    assert torch.allclose(LOSS_WEIGHTINGS["edm"](t, 5.0, 0.5), edm * t * t, rtol=1e-5)
    model = build_model("DiT-T/4", 8, 1, 2)
    x = torch.randn(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    losses = {name: FlowMatching("uniform", name).loss(model, x, y, t, torch.randn_like(x)).item()
              for name in LOSS_WEIGHTINGS}
    assert all(math.isfinite(v) for v in losses.values()) and len(set(losses.values())) == len(losses)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        config.load(None, {"diffusion.min_snr_gamma": 0})


def test_guidance_applies_only_inside_its_interval():
    torch.manual_seed(0)
    model = build_model("DiT-T/4", 8, 1, 3).eval()
    for p in model.parameters():  # adaLN-Zero starts at a constant output: make the classes matter
        torch.nn.init.normal_(p, std=0.05)
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    plain = solve(model, noise, labels, 4, "euler", cfg_scale=1.0)
    guided = solve(model, noise, labels, 4, "euler", cfg_scale=3.0)
    never = solve(model, noise, labels, 4, "euler", cfg_scale=3.0, guidance_interval=(0.0, 0.0))
    always = solve(model, noise, labels, 4, "euler", cfg_scale=3.0, guidance_interval=(0.0, 1.0))
    middle = solve(model, noise, labels, 4, "euler", cfg_scale=3.0, guidance_interval=(0.3, 0.8))
    assert torch.equal(never, plain) and torch.equal(always, guided)
    assert not torch.allclose(middle, plain) and not torch.allclose(middle, guided)
    with pytest.raises(ConfigError, match="guidance_min_t"):
        config.load(None, {"sample.guidance_min_t": 0.9, "sample.guidance_max_t": 0.5})
