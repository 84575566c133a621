"""The one training loop: report, validate, sample, checkpoint, done?, step, EMA."""

from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from genfoundry import accel, checkpoint
from genfoundry import config as config_lib
from genfoundry import metrics
from genfoundry.config import Config, ConfigError
from genfoundry.data.build import training_data
from genfoundry.diffusion import FlowMatching, generate, grid, save_png
from genfoundry.models import build_model
from genfoundry.trainer.precision import DynamicLossScaler

FORMAT_VERSION = 1


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.root) / cfg.run.name


class Trainer:
    """Builds everything a run needs from a Config; `train()` runs (or resumes) it to the end.

    To change one part, subclass and override a named method (`train_step`, `validate`, ...).
    """

    def __init__(self, cfg: Config, print_fn=print):
        self.cfg, self.print = cfg, print_fn
        self.run_dir = run_dir_of(cfg)
        self.device = accel.get_device(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        tc = cfg.train

        self.data = training_data(cfg.data, tc.batch_size, tc.val_batch_size, cfg.run.seed, self.device)
        self.loader = self.data.loader
        self.model = build_model(cfg.model.preset, self.data.resolution, self.data.channels,
                                 self.data.num_classes).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.objective = FlowMatching(cfg.diffusion.time_sampling, cfg.diffusion.loss_weighting,
                                      cfg.diffusion.logit_mean, cfg.diffusion.logit_std, cfg.model.class_dropout)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           weight_decay=tc.weight_decay)
        self.scaler = DynamicLossScaler(tc.loss_scale_init, tc.loss_scale_growth_interval) if tc.precision == "fp16" else None
        # All training randomness (time, noise, label dropout) comes from this generator, saved in checkpoints.
        self.generator = torch.Generator(self.device).manual_seed(cfg.run.seed)
        self.step, self.images_seen = 0, 0
        self.flops_per_image = 3 * self.model.flops_per_forward()
        self.peak_flops = accel.peak_flops(self.device, tc.precision)
        self._make_validation_batch()

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "data": self.loader.state_dict(),
            "generator": self.generator.get_state(),
            "rng": accel.rng_states(self.device),
            "config_hash": config_lib.config_hash(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config_hash"] != config_lib.config_hash(self.cfg):
            raise ConfigError("the checkpoint was written by a run with a different training config")
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        self.generator.set_state(state["generator"])
        accel.set_rng_states(self.device, state["rng"])

    def prepare_run_dir(self) -> None:
        """Creates the run directory, or checks that it belongs to this config and resumes from it."""
        saved = self.run_dir / "config.toml"
        if saved.exists():
            previous = config_lib.load(str(saved))
            changed = config_lib.identity_diff(previous, self.cfg)
            if changed:
                raise ConfigError(f"run directory '{self.run_dir}' holds a run with different {', '.join(changed)}; "
                                  f"choose another --run.name to start a new run")
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        saved.write_text(config_lib.dumps(self.cfg))
        state = checkpoint.load_latest(self.run_dir / "checkpoints", map_location=self.device)
        if state is not None:
            self.load_state_dict(state)
            self.print(f"resumed from step {self.step} ({self.images_seen} images seen)")

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        tc = self.cfg.train
        self.prepare_run_dir()
        self.describe()
        self.jsonl = metrics.JsonlSink(self.run_dir / "metrics.jsonl")
        self.console = metrics.ConsoleSink(tc.steps, self.print)
        start_step = self.step
        self._tick = (time.perf_counter(), self.step)
        last = {}
        while True:
            done = self.step >= tc.steps
            fresh = self.step != start_step or start_step == 0  # events at the resume point already ran
            if fresh and (done or self.step % tc.log_every == 0 or self.step % tc.val_every == 0):
                last = self.report(validate=done or self.step % tc.val_every == 0)
            if fresh and tc.sample_every and self.step % tc.sample_every == 0 and self.step > 0:
                self.sample_grid(f"grid-{self.step:07d}.png")
            if tc.checkpoint_every and self.step > start_step and (done or self.step % tc.checkpoint_every == 0):
                checkpoint.save(self.state_dict(), self.run_dir / "checkpoints", self.step, tc.keep_checkpoints)
            if done:
                break
            self.train_step()
        self.save_final()
        return last

    def train_step(self) -> None:
        tc = self.cfg.train
        x, y = self.loader.next_batch()
        y = y.clamp(min=0)  # unlabelled samples (-1) share class 0
        t, eps, drop = self.objective.draw(x, self.generator)
        with accel.autocast(self.device, tc.precision):
            loss = self.objective.loss(self.model, x, y, t, eps, drop)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.scaler.scale if self.scaler else loss).backward()
        params = list(self.model.parameters())
        finite = self.scaler.unscale_and_check(params) if self.scaler else True
        if finite:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            self.optimizer.step()
            self.update_ema()
            metrics.report("grad_norm", grad_norm)
        if self.scaler:
            self.scaler.update(finite)
            metrics.report("loss_scale", self.scaler.scale)
            metrics.report("skipped_steps", 0.0 if finite else 1.0)
        metrics.report("loss", loss)
        self.step += 1
        self.images_seen += tc.batch_size

    def learning_rate(self, step: int) -> float:
        tc = self.cfg.train
        return tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA with a half-life in images (EDM2 style), ramped up early in training."""
        tc = self.cfg.train
        halflife = tc.ema_halflife_kimg * 1000
        if tc.ema_rampup > 0:
            halflife = min(halflife, self.images_seen * tc.ema_rampup)
        beta = 0.5 ** (tc.batch_size / max(halflife, 1e-8))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.model.parameters()], 1.0 - beta)

    # ---- events --------------------------------------------------------------------------------

    def _make_validation_batch(self) -> None:
        """The same held-out images, times and noise at every validation, so the curve is comparable."""
        x = torch.from_numpy(self.data.val_images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        gen = torch.Generator().manual_seed(self.cfg.run.seed + 7919)
        t = torch.sigmoid(torch.randn(len(x), generator=gen))
        eps = torch.randn(x.shape, generator=gen)
        self.val_batch = tuple(v.to(self.device) for v in (x, torch.from_numpy(self.data.val_labels), t, eps))

    @torch.no_grad()
    def validate(self) -> dict:
        x, y, t, eps = self.val_batch
        out = {}
        for key, net in (("val_loss", self.model), ("val_loss_ema", self.ema)):
            was_training = net.training
            net.eval()
            with accel.autocast(self.device, self.cfg.train.precision):
                out[key] = self.objective.loss(net, x, y, t, eps).item()
            net.train(was_training)
        return out

    def report(self, validate: bool) -> dict:
        now = time.perf_counter()
        accel.synchronize(self.device)
        values = metrics.collect()
        elapsed, steps = now - self._tick[0], self.step - self._tick[1]
        self._tick = (now, self.step)
        if steps:
            ips = steps * self.cfg.train.batch_size / elapsed
            values["images_per_s"] = ips
            values["eta_s"] = (self.cfg.train.steps - self.step) * self.cfg.train.batch_size / ips
            if self.peak_flops:
                values["mfu"] = ips * self.flops_per_image / self.peak_flops
        values["lr"] = self.learning_rate(self.step)
        values["images_seen"] = self.images_seen
        peak = accel.max_memory_allocated(self.device)
        values["peak_memory_gb"] = (peak if peak is not None else
                                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        if validate:
            values.update(self.validate())
        self.jsonl.write(self.step, values)
        self.console.write(self.step, values)
        self._tick = (time.perf_counter(), self.step)  # validation time is not training time
        return values

    def sample_grid(self, name: str) -> Path:
        sc, k = self.cfg.sample, self.data.num_classes
        labels = torch.arange(k).repeat_interleave(sc.per_class)
        images = generate(self.ema, labels, range(len(labels)), sc.seed, sc.steps, sc.sampler, sc.cfg_scale,
                          sc.batch_size, self.device, sc.precision)
        path = self.run_dir / "samples" / name
        save_png(grid(images, rows=k), path)
        return path

    def save_final(self) -> None:
        final = self.run_dir / "final"
        final.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.ema.state_dict().items()}, str(final / "ema.safetensors"))
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(final / "model.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "preset": self.cfg.model.preset,
                "arch": self.model.arch.to_dict(), "class_names": self.data.class_names,
                "source": self.data.name, "step": self.step, "images_seen": self.images_seen}
        (final / "model.json").write_text(json.dumps(meta, indent=2))
        path = self.sample_grid("final.png")
        self.print(f"final weights in {final}, samples in {path}")

    def describe(self) -> None:
        m, ds = self.model, self.data
        params = sum(p.numel() for p in m.parameters())
        self.print(f"run {self.run_dir}  device {self.device} ({accel.device_name(self.device)})  "
                   f"precision {self.cfg.train.precision}")
        self.print(f"data {ds.name}: {ds.resolution}x{ds.resolution}x{ds.channels} images, "
                   f"{ds.num_classes} classes   model {self.cfg.model.preset}: {params / 1e6:.2f}M params, "
                   f"{m.flops_per_forward() / 1e9:.3f} GFLOP/forward/image")

