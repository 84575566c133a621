"""The diffusers DDPM baseline of the convergence benchmark: its padding helper, timed training, sampling
and the recipe it reports, on the CPU with the tiny UNet."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from genfoundry import accel  # noqa: E402
from genfoundry.bench.ddpm_baseline import DDPMBaseline, pad_to_rgb32  # noqa: E402
from genfoundry.errors import ConfigError, GenfoundryError  # noqa: E402


def garments(n: int, seed: int = 0) -> np.ndarray:
    """Fashion-MNIST-like uint8 [n, 28, 28, 1]: bright filled rectangles and discs of random size and
    brightness on black, with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28), np.float32)
    for i in range(n):
        cy, cx, r = rng.integers(9, 19), rng.integers(9, 19), rng.integers(4, 9)
        if i % 2:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2 + 2)
        out[i][mask] = rng.uniform(120, 255)
    out += rng.normal(0, 8, out.shape) * (out > 0)
    return np.clip(out, 0, 255).astype(np.uint8)[..., None]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy two-core machine two threads of small convolutions wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    return pad_to_rgb32(garments(192))


@pytest.fixture(scope="module")
def trained(one_thread, images):
    """A tiny baseline after one short warm-up call and one 2-second call of train_for."""
    baseline = DDPMBaseline(images, "cpu", batch_size=8, tiny=True, seed=0)
    warmup = baseline.train_for(0.01)
    result = baseline.train_for(2.0)
    return baseline, warmup, result


def test_pad_to_rgb32_centres_on_black_and_repeats_grey():
    grey = garments(5)
    out = pad_to_rgb32(grey)
    assert out.dtype == torch.uint8 and out.shape == (5, 32, 32, 3)
    assert torch.equal(out[:, 2:30, 2:30, 0], torch.from_numpy(grey[..., 0]))
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert out[:, border].max() == 0 and out.max() > 0
    assert torch.equal(pad_to_rgb32(grey[..., 0]), out)                  # [N, H, W] as well
    assert torch.equal(pad_to_rgb32(out), out)                            # 32-px RGB: unchanged
    rgb = torch.randint(0, 256, (2, 30, 29, 3), dtype=torch.uint8)
    padded = pad_to_rgb32(rgb)
    assert torch.equal(padded[:, 1:31, 1:30], rgb) and padded[:, 0].max() == 0 and padded[:, :, 30:].max() == 0


def test_pad_to_rgb32_refuses_what_it_cannot_pad():
    with pytest.raises(GenfoundryError, match="uint8"):
        pad_to_rgb32(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(GenfoundryError, match="at most 32x32"):
        pad_to_rgb32(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(GenfoundryError, match=r"\[N, H, W"):
        pad_to_rgb32(np.zeros((2, 28, 28, 4), np.uint8))


def test_train_for_keeps_to_its_budget(trained):
    baseline, warmup, result = trained
    assert warmup["steps"] == 1  # the first clock check is past a 0.01 s budget
    assert result["steps"] >= 3
    assert result["images_seen"] == 8 * result["steps"]
    assert 2.0 <= result["train_s"] < 2.0 + 2.5  # stops at the first step past the budget
    assert result["images_per_s"] == pytest.approx(result["images_seen"] / result["train_s"])
    assert math.isfinite(result["loss"]) and 0.05 < result["loss"] < 3.0  # epsilon MSE starts near 1
    assert result["total_steps"] == baseline.step == warmup["steps"] + result["steps"] == baseline.ema.optimization_step
    assert result["total_train_s"] == pytest.approx(warmup["train_s"] + result["train_s"])
    # linear warm-up of the cosine schedule, and the EMA's warm-up 1 - (1 + step - 1)^-3/4
    assert result["lr"] == pytest.approx(1e-4 * baseline.step / 500)
    assert result["ema_decay"] == pytest.approx(1 - baseline.step ** -0.75)
    assert not result["schedule_done"]
    with pytest.raises(ConfigError, match="positive number"):
        baseline.train_for(0)


def test_training_changes_the_weights_and_the_ema_trails_them(trained, images):
    baseline, _, _ = trained
    fresh = DDPMBaseline(images, "cpu", batch_size=8, tiny=True, seed=0)
    start = [p.detach() for p in fresh.unet.parameters()]
    moved = sum((p.detach() - s).abs().sum().item() for p, s in zip(baseline.unet.parameters(), start))
    assert moved > 0
    ema = baseline.ema.shadow_params
    ema_gap = sum((e - p.detach()).abs().sum().item() for e, p in zip(ema, baseline.unet.parameters()))
    from_start = sum((e - s).abs().sum().item() for e, s in zip(ema, start))
    assert ema_gap > 0 and from_start > 0  # between the initial and the current weights


def test_sample_is_uint8_images_deterministic_per_seed(trained):
    baseline, _, _ = trained
    a = baseline.sample(4, seed=0, inference_steps=5, scheduler="ddim")
    assert a.dtype == torch.uint8 and a.shape == (4, 32, 32, 3) and a.device.type == "cpu"
    assert torch.equal(baseline.sample(4, seed=0, inference_steps=5, scheduler="ddim"), a)
    assert not torch.equal(baseline.sample(4, seed=1, inference_steps=5, scheduler="ddim"), a)
    # batches draw from one generator: the first batch of a larger call is the same images
    assert torch.equal(baseline.sample(6, seed=0, inference_steps=5, scheduler="ddim", batch_size=4)[:4], a)
    ddpm = baseline.sample(2, seed=0, inference_steps=4)
    assert ddpm.shape == (2, 32, 32, 3) and not torch.equal(ddpm, a[:2])
    assert torch.equal(baseline.sample(2, seed=0, inference_steps=4), ddpm)  # its step noise comes from the seed too
    assert baseline.unet.training  # sampling uses a copy of the network, holding the EMA weights
    sampled_with = list(baseline._ema_unet.parameters())
    assert all(torch.equal(w, e) for w, e in zip(sampled_with, baseline.ema.shadow_params))
    assert not all(torch.equal(w, p) for w, p in zip(sampled_with, baseline.unet.parameters()))


def test_same_seed_same_start_other_seed_other_start(one_thread, images):
    one, same = (DDPMBaseline(images, "cpu", batch_size=8, tiny=True, seed=3) for _ in range(2))
    other = DDPMBaseline(images, "cpu", batch_size=8, tiny=True, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(one.unet.parameters(), same.unet.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(one.unet.parameters(), other.unet.parameters()))
    x = one.sample(2, inference_steps=2, scheduler="ddim")
    assert torch.equal(same.sample(2, inference_steps=2, scheduler="ddim"), x)


def test_recipe_has_the_examples_defaults(one_thread, images):
    baseline = DDPMBaseline(images[:16], "cpu", batch_size=128, dataset_size_for_schedule=60000)
    recipe = baseline.recipe
    json.dumps(recipe)  # goes into the benchmark's JSON as it is
    model = recipe["model"]
    assert model["config"]["block_out_channels"] == [128, 128, 256, 256, 512, 512]
    assert model["config"]["layers_per_block"] == 2
    assert model["config"]["down_block_types"][4] == "AttnDownBlock2D"
    assert model["config"]["up_block_types"][1] == "AttnUpBlock2D"
    assert model["config"]["sample_size"] == 32 and not recipe["tiny"]
    assert model["parameters"] == sum(p.numel() for p in baseline.unet.parameters()) > 100e6
    assert recipe["optimizer"] == {"class": "torch.optim.AdamW", "lr": 1e-4, "betas": [0.95, 0.999],
                                   "weight_decay": 1e-6, "eps": 1e-8}
    noise = recipe["noise_scheduler"]
    assert noise["num_train_timesteps"] == 1000
    assert (noise["beta_schedule"], noise["prediction_type"]) == ("linear", "epsilon")
    schedule = recipe["lr_schedule"]
    assert (schedule["name"], schedule["warmup_steps"], schedule["num_epochs"]) == ("cosine", 500, 100)
    assert schedule["steps_per_epoch"] == 469 and schedule["training_steps"] == 46900
    assert recipe["ema"]["decay"] == 0.9999 and recipe["ema"]["inv_gamma"] == 1.0 and recipe["ema"]["power"] == 0.75
    assert recipe["grad_clip_norm"] == 1.0
    assert recipe["sampler"]["inference_steps"] == 1000 and recipe["sampler"]["weights"] == "EMA"
    assert recipe["precision"]["network"] == "fp32"  # on a CPU, whatever was asked
    assert recipe["batch_size"] == 128 and recipe["data"]["images"] == 16


def test_bad_arguments_are_one_line_errors(images):
    with pytest.raises(ConfigError, match="precision"):
        DDPMBaseline(images, "cpu", precision="fp8", tiny=True)
    with pytest.raises(ConfigError, match="batch_size"):
        DDPMBaseline(images, "cpu", batch_size=0, tiny=True)
    if accel.accelerator_type() == "cpu":
        with pytest.raises(ConfigError, match="not available here"):
            DDPMBaseline(images, "cuda", tiny=True)
    with pytest.raises(GenfoundryError, match="uint8"):
        DDPMBaseline(images.float(), "cpu", tiny=True)
    with pytest.raises(GenfoundryError, match="square RGB"):
        DDPMBaseline(images[..., :1], "cpu", tiny=True)
    with pytest.raises(GenfoundryError, match="multiple of 32"):
        DDPMBaseline(torch.zeros(4, 48, 48, 3, dtype=torch.uint8), "cpu")
    baseline = DDPMBaseline(images[:8], "cpu", tiny=True)
    with pytest.raises(ConfigError, match="scheduler"):
        baseline.sample(1, scheduler="euler")
    with pytest.raises(ConfigError, match="at most 1000"):
        baseline.sample(1, inference_steps=1001)
    with pytest.raises(ConfigError, match="num_images"):
        baseline.sample(0)
