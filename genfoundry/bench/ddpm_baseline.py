"""The baseline of the convergence benchmark: diffusers' own unconditional DDPM training recipe.

The recipe is that of diffusers' example `examples/unconditional_image_generation/train_unconditional.py`
(huggingface/diffusers), with the defaults of its argument parser and of the commands in its README:

- model: `UNet2DModel` with block_out_channels (128, 128, 256, 256, 512, 512), layers_per_block 2,
  five `DownBlock2D` and one `AttnDownBlock2D` (the fifth level), mirrored by `UpBlock2D` with one
  `AttnUpBlock2D` (the second up level); everything else at the class's defaults (attention head
  dim 8, 32 groups, SiLU, positional time embedding, attention in the mid block). Unconditional.
- noise: `DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")`
  (`--ddpm_num_steps`, `--ddpm_beta_schedule`, `--prediction_type`); loss MSE between the predicted
  and the drawn noise, in fp32; timesteps uniform in [0, 1000).
- optimizer: `torch.optim.AdamW(lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)`
  (`--learning_rate`, `--adam_beta1/2`, `--adam_weight_decay`, `--adam_epsilon`); gradients clipped
  to norm 1.0 before every update.
- learning rate: `diffusers.optimization.get_scheduler("cosine", num_warmup_steps=500,
  num_training_steps=num_epochs x steps per epoch)`, 100 epochs (`--lr_scheduler`, `--lr_warmup_steps`,
  `--num_epochs`); an epoch is ceil(dataset size / batch size) steps (its DataLoader keeps the last,
  smaller batch). Training ends where the schedule does, as the example's loop does.
- EMA: `diffusers.training_utils.EMAModel(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3/4)`
  (`--use_ema` as in every README command, `--ema_max_decay`, `--ema_inv_gamma`, `--ema_power`),
  updated after every optimizer step; samples come from it.
- data: each image scaled to [-1, 1] (`ToTensor` then `Normalize([0.5], [0.5])`), reshuffled every
  epoch; no flips (`--random_flip` is off by default). At the benchmark's 32 px the example's resize
  and crop are the identity.
- sampling: what `DDPMPipeline` does, 1000 DDPM steps (`--ddpm_num_inference_steps`), starting from
  Gaussian noise from one seeded generator, output `(x / 2 + 0.5).clamp(0, 1) * 255` rounded.

What differs, on purpose: the batch size (the example's 16 is given by the caller) and the precision:
the network runs under bf16 autocast on an accelerator (the example's `--mixed_precision=bf16`
through accelerate, which also casts the images and noise to bf16; here they stay fp32) and in fp32 on
a CPU. The data live on the device as uint8 and batches are drawn there, with no loader processes.
The EMA update uses `EMAModel`'s `foreach=True`, the same arithmetic in fewer kernel launches.

`tiny=True` shrinks only the network (block_out_channels (32, 32, 64, 64), one layer per block, the
attention at the third level), so that CPU tests finish in seconds.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from genfoundry import accel
from genfoundry.errors import ConfigError, GenfoundryError

EXAMPLE = "huggingface/diffusers examples/unconditional_image_generation/train_unconditional.py"
EXAMPLE_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"  # the version whose defaults are written below

UNET = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)
TINY_UNET = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
NOISE = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
ADAMW = dict(lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
LR_SCHEDULE = dict(name="cosine", warmup_steps=500, num_epochs=100)
GRAD_CLIP_NORM = 1.0
EMA = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
INFERENCE_STEPS = 1000
SCHEDULERS = ("ddpm", "ddim")
PRECISIONS = ("bf16", "fp32")
CHECK_EVERY = 10  # training steps between clock checks (each one a device synchronisation) on an accelerator


def pad_to_rgb32(images) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] from uint8 images [N, H, W], [N, H, W, 1] or [N, H, W, 3] of at most 32 px:
    centred on a zero (black) border and, when grey, repeated into three equal channels. This is how
    the benchmark feeds Fashion-MNIST's 28-px images to the example's 3-channel UNet, and how it
    prepares the reference images the samples are scored against."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise GenfoundryError(f"pad_to_rgb32 takes uint8 images, not {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise GenfoundryError(f"pad_to_rgb32 takes images [N, H, W] or [N, H, W, 1 or 3], not {list(x.shape)}")
    n, h, w, c = x.shape
    if h > 32 or w > 32:
        raise GenfoundryError(f"pad_to_rgb32 takes images of at most 32x32 pixels, not {h}x{w}")
    top, left = (32 - h) // 2, (32 - w) // 2
    out = torch.zeros((n, 32, 32, 3), dtype=torch.uint8, device=x.device)
    out[:, top:top + h, left:left + w, :] = x.expand(n, h, w, 3)
    return out


def _diffusers():
    """The diffusers module, or a one-line error saying how to install it."""
    try:
        import diffusers
        import diffusers.optimization
        import diffusers.training_utils
    except ImportError:
        raise GenfoundryError("the DDPM baseline needs diffusers: pip install 'genfoundry[bench]'") from None
    return diffusers


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device '{device}' is not a device torch knows: {e}") from None
    if device.type != "cpu":
        here = accel.accelerator_type()
        if device.type != here:
            raise ConfigError(f"device '{device}' is not available here; this machine has '{here}'")
        if device.index is None:  # a generator and the data must name one device
            device = torch.device(device.type, accel.device_module(device).current_device())
    return device


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class DDPMBaseline:
    """diffusers' unconditional DDPM recipe (see the module docstring) on `images`, a uint8 tensor
    [N, H, W, 3] kept on `device`, trained in timed slices by `train_for` and sampled from its EMA by
    `sample`. `dataset_size_for_schedule` sets the epoch length of the learning-rate schedule (default
    N); `seed` fixes the initial weights, the data order and the training noise."""

    def __init__(self, images: torch.Tensor, device, batch_size: int = 128, precision: str = "bf16", seed: int = 0,
                 dataset_size_for_schedule: int | None = None, tiny: bool = False):
        diffusers = _diffusers()
        self.device = _device(device)
        self.batch_size = _positive_int(batch_size, "batch_size")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.requested_precision = precision
        self.precision = precision if self.device.type != "cpu" else "fp32"  # bf16 autocast is slower on most CPUs
        self.seed = int(seed)
        self.tiny = bool(tiny)

        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise GenfoundryError("images must be a uint8 torch tensor [N, H, W, 3]")
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise GenfoundryError(f"images must be square RGB, [N, H, H, 3], not {list(images.shape)}")
        arch = TINY_UNET if self.tiny else UNET
        halvings = len(arch["block_out_channels"]) - 1
        self.resolution = int(images.shape[1])
        if self.resolution % 2**halvings:
            raise GenfoundryError(f"this UNet halves the images {halvings} times, so their size must be a multiple"
                                  f" of {2**halvings}, not {self.resolution}")
        self.num_images = int(images.shape[0])
        if self.num_images == 0:
            raise GenfoundryError("images is empty")
        self.data = images.to(self.device).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW on the device
        self.dataset_size_for_schedule = _positive_int(
            self.num_images if dataset_size_for_schedule is None else dataset_size_for_schedule,
            "dataset_size_for_schedule")

        torch.manual_seed(self.seed)  # the initial weights, drawn on the host: the same on every device
        self.unet = diffusers.UNet2DModel(sample_size=self.resolution, **arch).to(self.device)
        self.unet.train()
        self.parameters = list(self.unet.parameters())
        self.noise_scheduler = diffusers.DDPMScheduler(**NOISE)
        self.optimizer = torch.optim.AdamW(self.parameters, **ADAMW)
        self.steps_per_epoch = math.ceil(self.dataset_size_for_schedule / self.batch_size)
        self.total_steps = LR_SCHEDULE["num_epochs"] * self.steps_per_epoch
        self.lr_scheduler = diffusers.optimization.get_scheduler(
            LR_SCHEDULE["name"], optimizer=self.optimizer, num_warmup_steps=LR_SCHEDULE["warmup_steps"],
            num_training_steps=self.total_steps)
        self.ema = diffusers.training_utils.EMAModel(self.parameters, foreach=True, **EMA)
        self._ema_unet = None  # a copy of the network that sampling loads the EMA weights into

        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self._order, self._cursor = None, self.num_images
        self.step = 0          # optimizer steps so far
        self.images_seen = 0
        self.epoch = 0         # epochs started
        self.train_seconds = 0.0

    @property
    def done(self) -> bool:
        """Whether the learning-rate schedule has run to its end (where the example stops training)."""
        return self.step >= self.total_steps

    def _batch(self) -> torch.Tensor:
        """The next batch of the current epoch in [-1, 1], float32 NCHW; a new random order each epoch."""
        if self._cursor >= self.num_images:
            self._order = torch.randperm(self.num_images, generator=self.generator, device=self.device)
            self._cursor = 0
            self.epoch += 1
        index = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return self.data[index].float().div_(127.5).sub_(1.0)

    def _train_step(self) -> torch.Tensor:
        clean = self._batch()
        noise = torch.randn(clean.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(0, NOISE["num_train_timesteps"], (clean.shape[0],), generator=self.generator,
                                  device=self.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        with accel.autocast(self.device, self.precision):
            predicted = self.unet(noisy, timesteps).sample
        loss = F.mse_loss(predicted.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, GRAD_CLIP_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.parameters)
        self.step += 1
        self.images_seen += clean.shape[0]
        return loss.detach()

    def train_for(self, seconds: float) -> dict:
        """Train for `seconds` more of training time, or until the schedule ends: {steps, images_seen,
        train_s, loss (mean per step over this call), images_per_s, ...}. The clock is read after a device
        synchronisation every few steps (every step on a CPU, where that costs nothing), and stops at the
        first reading past the budget; `train_s` is exactly the time those steps took."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ConfigError(f"seconds must be a positive number, not {seconds!r}")
        check_every = 1 if self.device.type == "cpu" else CHECK_EVERY
        steps = images = 0
        loss_sum = torch.zeros((), device=self.device)
        accel.synchronize(self.device)
        started = time.perf_counter()
        elapsed = 0.0
        while not self.done:
            before = self.images_seen
            loss_sum += self._train_step()
            steps += 1
            images += self.images_seen - before
            if steps % check_every == 0 or self.done:
                accel.synchronize(self.device)
                elapsed = time.perf_counter() - started
                if elapsed >= seconds:
                    break
        self.train_seconds += elapsed
        return {
            "steps": steps,
            "images_seen": images,
            "train_s": elapsed,
            "loss": loss_sum.item() / steps if steps else float("nan"),
            "images_per_s": images / elapsed if elapsed > 0 else 0.0,
            "total_steps": self.step,
            "total_images_seen": self.images_seen,
            "total_train_s": self.train_seconds,
            "epoch": self.images_seen / self.num_images,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "ema_decay": self.ema.cur_decay_value,
            "schedule_done": self.done,
        }

    def _sampling_scheduler(self, scheduler: str):
        diffusers = _diffusers()
        if scheduler == "ddpm":
            return diffusers.DDPMScheduler.from_config(self.noise_scheduler.config)
        return diffusers.DDIMScheduler.from_config(self.noise_scheduler.config)

    @torch.no_grad()
    def sample(self, num_images: int, seed: int = 0, inference_steps: int = INFERENCE_STEPS, scheduler: str = "ddpm",
               batch_size: int = 1000) -> torch.Tensor:
        """`num_images` samples from the EMA weights as uint8 [N, H, W, 3] on the host, as `DDPMPipeline`
        makes them: Gaussian noise, `inference_steps` steps of the scheduler ("ddpm", the example's
        1000 steps, or "ddim" with eta 0 from the same config), then [-1, 1] to [0, 255]. One generator
        seeded with `seed` draws all the noise, batch after batch, so the result depends only on the
        weights, `seed` and `batch_size`."""
        num_images = _positive_int(num_images, "num_images")
        batch_size = _positive_int(batch_size, "batch_size")
        inference_steps = _positive_int(inference_steps, "inference_steps")
        if inference_steps > NOISE["num_train_timesteps"]:
            raise ConfigError(f"inference_steps must be at most {NOISE['num_train_timesteps']}, not {inference_steps}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
        if self._ema_unet is None:
            self._ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema.copy_to(self._ema_unet.parameters())
        sampler = self._sampling_scheduler(scheduler)
        sampler.set_timesteps(inference_steps)
        step_args = {"eta": 0.0} if scheduler == "ddim" else {}
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        shape = (3, self.resolution, self.resolution)
        out = []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            x = torch.randn((n, *shape), generator=generator, device=self.device)
            for t in sampler.timesteps:
                t_batch = torch.full((n,), int(t), device=self.device, dtype=torch.long)
                with accel.autocast(self.device, self.precision):
                    eps = self._ema_unet(x, t_batch).sample
                x = sampler.step(eps.float(), t, x, generator=generator, **step_args).prev_sample
            x = (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
            out.append(x.permute(0, 2, 3, 1).cpu())
        return torch.cat(out)

    @property
    def recipe(self) -> dict:
        """Everything that defines this baseline, as JSON-ready values, for the benchmark's results."""
        config = {k: v for k, v in self.unet.config.items() if not k.startswith("_")}
        return _jsonable({
            "name": "diffusers DDPM (unconditional UNet2DModel)",
            "source": EXAMPLE,
            "source_commit": EXAMPLE_COMMIT,
            "diffusers_version": _diffusers().__version__,
            "tiny": self.tiny,
            "model": {"class": "diffusers.UNet2DModel", "config": config,
                      "parameters": sum(p.numel() for p in self.parameters)},
            "noise_scheduler": {"class": "diffusers.DDPMScheduler",
                                **{k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}},
            "loss": "MSE(predicted noise, noise) in fp32, timesteps uniform in [0, 1000)",
            "optimizer": {"class": "torch.optim.AdamW", **ADAMW},
            "grad_clip_norm": GRAD_CLIP_NORM,
            "lr_schedule": {"function": "diffusers.optimization.get_scheduler", **LR_SCHEDULE,
                            "dataset_size": self.dataset_size_for_schedule, "steps_per_epoch": self.steps_per_epoch,
                            "training_steps": self.total_steps},
            "ema": {"class": "diffusers.training_utils.EMAModel", **EMA, "min_decay": self.ema.min_decay,
                    "update_after_step": self.ema.update_after_step, "foreach": True, "every": "optimizer step"},
            "batch_size": self.batch_size,
            "precision": {"requested": self.requested_precision, "network": self.precision,
                          "autocast": self.precision == "bf16", "data_and_noise": "fp32"},
            "data": {"images": self.num_images, "resolution": self.resolution, "channels": 3,
                     "normalisation": "x / 127.5 - 1, to [-1, 1]", "augmentation": "none (random_flip off)",
                     "order": "reshuffled every epoch, last smaller batch kept", "on_device": True},
            "conditioning": "none",
            "sampler": {"weights": "EMA", "default": "ddpm", "inference_steps": INFERENCE_STEPS,
                        "like": "diffusers.DDPMPipeline", "ddim": "DDIMScheduler from the same config, eta 0",
                        "network_precision": self.precision},
            "seed": self.seed,
            "device": str(self.device),
        })
