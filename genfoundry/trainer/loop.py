"""The one training loop: report, validate, sample, checkpoint, done?, step, EMA.

The same loop runs on one process or many (launched by torchrun): `parallelize` wraps the model, each
step accumulates micro-batches to the configured global batch, and rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from genfoundry import accel, checkpoint, seeding
from genfoundry import metrics
from genfoundry.checkpoint.manager import CheckpointManager
from genfoundry.config import Config
from genfoundry.errors import ConfigError, GenfoundryError
from genfoundry.sources import SourceError
from genfoundry.data.build import TrainingData, training_data
from genfoundry.data.order import chunk_index
from genfoundry.diffusion import FlowMatching
from genfoundry.sampling import generate, grid, save_png
from genfoundry.distributed import parallel
from genfoundry.distributed.state import HookState, ParallelState
from genfoundry.models import build_model
from genfoundry.trainer.precision import DynamicLossScaler
from genfoundry.trainer.preemption import Preemption
from genfoundry.trainer import distill, schedule
from genfoundry.trainer.records import TrainerRecords
from genfoundry.trainer.state import TrainerState

FORMAT_VERSION = 1
VALIDATION_STREAM = 7919  # the word that sets the validation noise apart from every other seed of a run
EMA_WORSE = 1.1  # an EMA whose final validation loss is this many times the raw weights' is clearly worse


def ema_clearly_worse(val_loss: float | None, val_loss_ema: float | None) -> bool:
    """The one rule for EMA against raw weights: the run's closing note and `--weights auto` both use it."""
    return val_loss is not None and val_loss_ema is not None and val_loss_ema > EMA_WORSE * val_loss


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.root) / cfg.run.name


class Trainer(TrainerState, TrainerRecords):
    """Builds everything a run needs from a Config; `train()` runs (or resumes) it to the end.

    To change one part, subclass and override a named method (`train_step`, `validate`, ...).
    `data` replaces what `cfg.data` names (a benchmark's synthetic images, say). `on_report(step, values)`
    runs on every rank after each report with what was logged; an exception it raises ends the run
    (a hyper-parameter search stops hopeless trials this way).
    """

    DEVICE_SKIPS = ("cuda", "xpu")  # device types whose fused AdamW skips non-finite steps without the host

    def __init__(self, cfg: Config, print_fn=print, data: TrainingData | None = None, on_report=None):
        self.cfg = cfg
        self.run_dir = run_dir_of(cfg)
        self.device = accel.get_device(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.distributed = parallel.init_process_group(self.device, cfg.parallel.timeout_s)
        self.rank, self.world = accel.rank(), accel.world_size()
        self.print = print_fn if self.rank == 0 else (lambda *a, **k: None)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        tc = cfg.train

        self.on_report = on_report
        error = None
        try:
            self.data = data or training_data(cfg.data, tc.global_batch_size, tc.val_batch_size, cfg.run.seed,
                                              self.device)
        except GenfoundryError as e:  # a node-local copy may be broken on some ranks only
            error = e
        parallel.raise_together(error, lambda n: SourceError(
            f"{n} rank(s) cannot read the training data '{cfg.data.source}' (their messages say why)"))
        model = build_model(cfg.model.preset, self.data.resolution, self.data.channels,
                            self.data.num_classes).to(self.device)
        dc = cfg.diffusion
        flow = dict(time_sampling=dc.time_sampling, loss_weighting=dc.loss_weighting, logit_mean=dc.logit_mean,
                    logit_std=dc.logit_std, class_dropout=cfg.model.class_dropout, min_snr_gamma=dc.min_snr_gamma,
                    sigma_data=dc.sigma_data)
        self.teacher_meta = None
        if cfg.distill.teacher:
            teacher, error = None, None
            try:
                teacher, self.teacher_meta = distill.load_teacher(cfg, model, self.device)
            except GenfoundryError as e:
                error = e
            parallel.raise_together(error, lambda n: ConfigError(
                f"{n} rank(s) cannot load distill.teacher '{cfg.distill.teacher}' (their messages say why)"))
            model.folded_guidance = distill.folded_guidance(cfg)  # what sampling the student must know
            self.objective = distill.distillation_objective(cfg, teacher, flow)
        else:
            self.objective = FlowMatching(**flow)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.precision = accel.resolve_precision(tc.precision, self.device)  # a resume takes the checkpoint's
        self.model = parallel.parallelize(model, cfg.parallel, self.device)
        self.micro_batch = self.plan_micro_batch()
        self.accumulation = parallel.split_global_batch(tc.global_batch_size, self.world, self.micro_batch)
        self.loader = self.data.make_loader(self.rank, self.world, self.accumulation)
        if hasattr(self.loader, "failure_log"):  # samples that fail to decode, named in the run's records
            self.loader.failure_log = self.run_dir / "data-failures.jsonl"
        self.scaler = DynamicLossScaler(tc.loss_scale_init, tc.loss_scale_growth_interval) if self.precision == "fp16" else None
        # On an accelerator the fused AdamW kernel skips a non-finite step on the device itself, so no step
        # waits for the host to read the gradient norm: the host learns of skipped steps at the next report.
        self.device_skips = (self.device.type in self.DEVICE_SKIPS and self.scaler is None
                             and cfg.parallel.comm_hook == "none")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           weight_decay=tc.weight_decay,
                                           **({"fused": True} if self.device_skips else {}))
        self.unread_steps: list[torch.Tensor] = []  # device flags (finite?) of steps the host has not read
        self.overflow_streak = self.nonfinite_streak = 0
        self.parallel = ParallelState(self.model, self.optimizer, self.ema)
        self.hook = HookState(getattr(self.model, "comm_state", None), cfg.parallel.comm_hook, self.world, self.print,
                              parallel.comm_bytes_per_step(model, cfg.parallel.strategy, self.world, self.accumulation))
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.device, keep=ck.keep,
                                             keep_snapshots=ck.keep_snapshots, remote=ck.remote,
                                             keep_remote=ck.keep_remote, retries=ck.upload_retries,
                                             asynchronous=ck.asynchronous)
        self.preemption = Preemption(ck.grace_s)
        self.step, self.images_seen = 0, 0
        self.total_steps = tc.steps  # fewer where train.time_budget_s ends the run first
        self.train_time_s = 0.0  # training time so far: no validation, samples, saves or reports
        pc = cfg.parallel
        if pc.compile and pc.compile_scope == "loss":  # noise, network and error: one graph each way
            self._loss = torch.compile(self.keyed_loss, mode="reduce-overhead" if pc.cuda_graphs else None)
        elif pc.compile:  # the blocks are compiled by parallelize; the noise's hashing becomes one kernel
            draw = torch.compile(self.objective.draw_keyed)
            self._loss = lambda x, y, keys: self.keyed_loss(x, y, keys, draw)
        else:
            self._loss = self.keyed_loss
        self.cuda_graphs = pc.cuda_graphs and self.device.type == "cuda"
        self.flops_per_image = 3 * model.flops_per_forward()
        peak = accel.peak_flops(self.device, self.precision)
        self.peak_flops = peak * self.world if peak else None
        self._make_validation_batch()

    @property
    def net(self) -> torch.nn.Module:
        """The user's model (parameters, flops), inside whatever parallel wrapper trains it."""
        return parallel.unwrap(self.model)

    def plan_micro_batch(self) -> int:
        """The configured micro-batch; else the largest that fits (searched on an accelerator) or, on a
        CPU, the whole of this rank's share of the global batch."""
        tc = self.cfg.train
        if tc.micro_batch_size:
            return tc.micro_batch_size
        candidates = parallel.micro_batch_candidates(tc.global_batch_size, self.world)
        if self.device.type == "cpu":
            return candidates[0]
        shape = (self.data.channels, self.data.resolution, self.data.resolution)

        def try_micro(m: int) -> None:
            x = torch.randn(m, *shape, device=self.device)
            y = torch.zeros(m, dtype=torch.long, device=self.device)
            t = torch.rand(m, device=self.device)
            with parallel.gradient_sync(self.model, False), accel.autocast(self.device, self.precision):
                loss = self.objective.loss(self.model, x, y, t, torch.randn_like(x))
            loss.backward()
            accel.synchronize(self.device)
            for p in self.model.parameters():
                p.grad = None

        # The optimizer's two moments do not exist yet: hold their memory while searching.
        local = sum(parallel.local_part(p).numel() for p in self.model.parameters())
        reserve = torch.empty(2 * local, dtype=torch.float32, device=self.device)
        micro = parallel.find_micro_batch(try_micro, candidates, self.device, self.print)
        del reserve
        self.print(f"micro-batch {micro}: the largest of {candidates[:6]}... that fits")
        return micro

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs to `train.steps` and writes the final weights; returns the last report. After SIGTERM it
        saves a full checkpoint and returns early with {"preempted": step}."""
        with self.preemption.watching():
            try:
                return self._train()
            except BaseException:
                self.checkpoints.close(wait=False)  # a peer may be gone: do not wait on its gathers
                raise
            finally:
                if getattr(self, "tensorboard", None):
                    self.tensorboard.close()

    def _train(self) -> dict:
        tc, ck = self.cfg.train, self.cfg.checkpoint
        self.prepare_run_dir()
        self.describe()
        self.open_sinks()
        start_step = self.step
        if self.jsonl and (start_step or self.jsonl.path.exists()):  # from a checkpoint, or again from 0
            self.log_event("resume", start_step, {"images_seen": self.images_seen, "world_size": self.world,
                                                  "precision": self.precision})  # later rows supersede
        self._tick = (time.perf_counter(), self.step)
        self._first_interval = True  # its time holds start-up work (compilation): no budget estimate from it
        last = {}
        while True:
            done = self.step >= self.total_steps
            stop = not done and self.preemption.agreed()
            fresh = self.step != start_step or start_step == 0  # events at the resume point already ran
            if fresh and (done or self.step % tc.log_every == 0 or self.step % tc.val_every == 0):
                last = self.report(validate=done or self.step % tc.val_every == 0)
                done = self.step >= self.total_steps  # a time budget's plan may have moved the end
            other_work = time.perf_counter()  # samples, saves, the report: not training time
            if fresh and tc.sample_every and self.step % tc.sample_every == 0 and self.step > 0:
                self.sample_grid(f"grid-{self.step:07d}.png")
            if ck.full_every and self.step % ck.full_every == 0:
                self.read_step_flags()
            # Not while steps are non-finite: a rollback must find weights from before the streak.
            periodic = ck.full_every and self.step % ck.full_every == 0 and not self.nonfinite_streak
            if self.step > start_step and (stop or (ck.full_every and done) or periodic):
                metrics.report("checkpoint/stall_s", self.save_checkpoint("full"))
            if ck.snapshot_every and self.step > start_step and self.step % ck.snapshot_every == 0:
                metrics.report("checkpoint/stall_s", self.save_checkpoint("snapshot"))
            if fresh and tc.report_every and self.step % tc.report_every == 0 and self.step > start_step:
                self.refresh_report()
            if stop:
                return self.finish_preempted(saved=self.step > start_step)
            if done:
                break
            self._tick = (self._tick[0] + time.perf_counter() - other_work, self._tick[1])
            self.train_step()
        self.save_final(last)
        self.finish_checkpoints()
        self.refresh_report(final=True)
        return last

    def finish_checkpoints(self) -> None:
        """Waits until every checkpoint is durable (and uploaded), says what failed, and lets the
        manager's threads and host buffers go."""
        failures = self.checkpoints.wait()
        self.checkpoints.close()
        self.log_checkpoints(finished=True)
        if failures:
            self.print(f"{len(failures)} checkpoint write(s) or upload(s) failed during the run (see the warnings)")

    def finish_preempted(self, saved: bool) -> dict:
        self.finish_checkpoints()
        fulls = [r for r in self.checkpoints.records if r["kind"] == "full"]
        durable = self.rank != 0 or bool(fulls and fulls[-1]["step"] == self.step and fulls[-1]["durable_s"])
        if saved and not int(accel.all_reduce(torch.tensor([int(durable)]), "min").item()):
            raise checkpoint.CheckpointError(f"SIGTERM: the full state of step {self.step} could not be written "
                                             f"(the warning above says why); the run resumes from its previous "
                                             f"checkpoint")
        what = (f"saved the full state of step {self.step}" if saved else
                f"no step since the start at {self.step}, nothing new to save")
        self.print(f"SIGTERM: {what} within {time.monotonic() - self.preemption.since:.1f} s; run the same "
                   f"command to resume")
        self.barrier()
        return {"preempted": self.step}

    def noise_keys(self, micro: int) -> torch.Tensor:
        """Seeds of the samples of one micro-batch: (run seed, step, position in the global batch)."""
        first = chunk_index(self.rank, self.world, micro) * self.micro_batch
        base = seeding.mix(self.cfg.run.seed, self.step) % 2**62 + first
        return torch.arange(base, base + self.micro_batch, dtype=torch.int64, device=self.device)

    def train_step(self) -> None:
        """One optimizer step over the global batch: `accumulation` micro-batches on each rank, with the
        gradient reduction across ranks only on the last. Each micro-batch's loss is divided by the
        accumulation, so the gradient is the mean over the global batch however it is split."""
        tc = self.cfg.train
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler else 1.0
        self.hook.begin_step(scale, may_skip=True)  # any step may be skipped: overflow, NaN or inf
        waited = 0.0
        if self.cuda_graphs:  # the graphs' outputs of the last step (its gradients) are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        for micro in range(self.accumulation):
            before = time.perf_counter()
            x, y = self.loader.next_batch()
            waited += time.perf_counter() - before
            with parallel.gradient_sync(self.model, micro == self.accumulation - 1):
                with accel.autocast(self.device, self.precision):
                    loss = self._loss(x, y, self.noise_keys(micro))
                (loss * (scale / self.accumulation)).backward()
            metrics.report("loss", loss.detach())
        params = list(self.model.parameters())
        finite = self.unscale_and_check(params) if self.scaler else True
        if finite:
            clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # The same on every rank: the norm is of the reduced gradients.
            ok = torch.isfinite(grad_norm)
            if self.device_skips:  # the host does not wait: the fused step skips itself where not ok
                self.optimizer.found_inf = (~ok).float()
                self.unread_steps.append(ok)
                finite = None  # not known on the host until read_step_flags
            elif not self.scaler:
                finite = bool(ok)
        self.hook.finish_step(applied=finite is not False)
        self.checkpoints.before_update()  # a checkpoint's copy of the weights is complete
        if finite is not False:
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            self.optimizer.step()
            self.update_ema()  # after a skipped step the weights it follows are unchanged
            metrics.report("grad_norm", grad_norm if finite else torch.where(ok, grad_norm, 0.0))
            metrics.report("nonfinite_steps", 0.0 if finite else (~ok).float())
        else:
            metrics.report("nonfinite_steps", 0.0 if self.scaler else 1.0)  # fp16: an overflow, not counted here
            if not self.scaler:
                self.skip_nonfinite_step()
        if self.scaler:
            self.scaler.update(finite)
            metrics.report("loss_scale", self.scaler.scale)
            metrics.report("skipped_steps", 0.0 if finite else 1.0)
            self.overflow_streak = 0 if finite else self.overflow_streak + 1
            if self.overflow_streak >= tc.fp16_max_overflows:
                self.fall_back_to_fp32()
        if finite is not None:
            self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        # Host time waiting for batches over the step's time; per rank, so a slow loader shows in .max.
        metrics.report("data/wait_fraction", waited / max(time.perf_counter() - started, 1e-9), spread=True)
        self.step += 1
        self.images_seen += tc.global_batch_size

    def read_step_flags(self) -> None:
        """Reads the device's finite flags of the steps since the last read (one wait for the device):
        counts the non-finite ones, skipped on the device, and rolls back after too many in a row."""
        if not self.unread_steps:
            return
        flags = torch.stack(self.unread_steps).tolist()
        self.unread_steps = []
        for ok in flags:
            if not ok:
                self.skip_nonfinite_step()
            self.nonfinite_streak = 0 if ok else self.nonfinite_streak + 1

    def keyed_loss(self, x, y, keys, draw=None) -> torch.Tensor:
        """The training loss of one micro-batch, its noise drawn from the samples' keys (what
        `parallel.compile_scope=loss` compiles as one graph)."""
        y = torch.where(y < 0, self.data.num_classes, y)  # unlabelled (-1): the null class
        t, eps, drop = (draw or self.objective.draw_keyed)(x, keys)
        return self.objective.loss(self.model, x, y, t, eps, drop)

    def unscale_and_check(self, params) -> bool:
        """fp16: unscales the gradients; True if all are finite on every rank (shards differ under FSDP2)."""
        grads = [parallel.local_part(p.grad) for p in params if p.grad is not None]
        finite = self.scaler.unscale_and_check(grads) if grads else True
        if self.distributed:
            finite = bool(accel.all_reduce(torch.tensor([1.0 if finite else 0.0]), "min").item())
        return finite

    def skip_nonfinite_step(self) -> None:
        """A non-finite loss or gradient (fp32, bf16): the step is skipped; after
        `checkpoint.nonfinite_rollback` in a row, the weights go back to the last full checkpoint."""
        limit = self.cfg.checkpoint.nonfinite_rollback
        if not limit or self.nonfinite_streak + 1 < limit:
            return
        self.print(f"step {self.step}: {limit} steps in a row had a non-finite loss or gradient")
        back = self.roll_back()
        self.nonfinite_streak = -1  # counted back to 0 below
        if back is False:
            self.print("no full checkpoint to roll back to yet: the weights stay, the run goes on")
            return
        self.print(f"rolled the weights, optimizer and EMA back to step {back}; the run goes on with the next data")
        self.log_event("rollback", self.step, {"to_step": back})

    def fall_back_to_fp32(self) -> None:
        """After too many overflowing fp16 steps in a row, train on in fp32 (recorded in checkpoints)."""
        self.print(f"fp16: {self.overflow_streak} consecutive steps overflowed (loss scale "
                   f"{self.scaler.scale:g}); switching this run to fp32")
        metrics.report("precision_fallback", 1.0)
        self.precision, self.scaler, self.overflow_streak = "fp32", None, 0

    def learning_rate(self, step: int) -> float:
        """The peak (`train.lr`, scaled to the batch) times the schedule's factor at `step` of
        `total_steps` (trainer/schedule.py)."""
        tc = self.cfg.train
        return schedule.peak_lr(tc) * schedule.lr_factor(tc.lr_schedule, step, self.total_steps, tc.warmup_steps,
                                                         tc.decay_fraction, tc.min_lr_ratio)

    def plan_budget(self, interval_steps: int, interval_s: float) -> None:
        """With `train.time_budget_s`: the steps the rest of the budget allows, agreed by every rank
        (the slowest rank's clock), so that all stop at one step with one learning-rate schedule."""
        tc = self.cfg.train
        if not tc.time_budget_s:
            return
        used = self.train_time_s
        if self.distributed:
            used = float(accel.all_reduce(torch.tensor([used], dtype=torch.float64), "max").item())
        if self.step >= self.total_steps:  # the planned end is reached: the run stops here
            return
        if self._first_interval:  # no rate from an interval that held compilation; stop only on the clock
            interval_steps = 0
        self.total_steps = schedule.budgeted_total(self.step, tc.steps, used, tc.time_budget_s, interval_steps,
                                                   interval_s)

    def ema_halflife(self) -> float:
        """The EMA half-life in images now: `ema_halflife_kimg`, at most `ema_rampup` x images seen."""
        tc = self.cfg.train
        halflife = tc.ema_halflife_kimg * 1000
        return min(halflife, self.images_seen * tc.ema_rampup) if tc.ema_rampup > 0 else halflife

    def update_ema(self) -> None:
        """EMA with a half-life in images (EDM2 style), ramped up early in training."""
        self.parallel.update_ema(0.5 ** (self.cfg.train.global_batch_size / max(self.ema_halflife(), 1e-8)))

    # ---- events --------------------------------------------------------------------------------

    def _make_validation_batch(self) -> None:
        """The same held-out images, times and noise at every validation, so the curve is comparable."""
        x = torch.from_numpy(self.data.val_images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        gen = torch.Generator().manual_seed(seeding.mix(self.cfg.run.seed, VALIDATION_STREAM))
        t, eps, _ = self.objective.draw(x, gen)  # times as diffusion.time_sampling says, as in training
        self.val_batch = tuple(v.to(self.device) for v in (x, torch.from_numpy(self.data.val_labels), t, eps))

    @torch.no_grad()
    def validate(self) -> dict:
        """Every rank computes the same numbers (FSDP2's forward needs them all)."""
        x, y, t, eps = self.val_batch
        self.parallel.gather_ema()
        out = {}
        for key, net in (("val_loss", self.model), ("val_loss_ema", self.ema)):
            was_training = net.training
            net.eval()
            with accel.autocast(self.device, self.precision):
                out[key] = self.objective.loss(net, x, y, t, eps).item()
            net.train(was_training)
        return out

    def report(self, validate: bool) -> dict:
        accel.synchronize(self.device)
        now = time.perf_counter()
        self.read_step_flags()
        allocated, peak = accel.memory_gb(self.device)
        metrics.report("memory_allocated_gb", allocated, spread=True)  # per rank: FSDP2 shards differ
        metrics.report("peak_memory_gb", peak, spread=True)
        values = metrics.collect()
        if values.get("comm/bytes_per_step") and values.get("comm/dense_bytes_per_step") is not None:
            values["comm/compression_ratio"] = values["comm/dense_bytes_per_step"] / values["comm/bytes_per_step"]
        elapsed, steps = now - self._tick[0], self.step - self._tick[1]
        self._tick = (now, self.step)
        self.train_time_s += elapsed
        self.plan_budget(steps, elapsed)
        if steps:
            self._first_interval = False
            ips = steps * self.cfg.train.global_batch_size / elapsed
            values["images_per_s"] = ips
            values["eta_s"] = (self.total_steps - self.step) * self.cfg.train.global_batch_size / ips
            if self.peak_flops:
                values["mfu"] = ips * self.flops_per_image / self.peak_flops
        values["lr"] = self.learning_rate(self.step)
        values["images_seen"] = self.images_seen
        values["train_time_s"], values["total_steps"] = self.train_time_s, self.total_steps
        values["restarts"], values["rollbacks"] = self.restarts, self.rollbacks
        if validate:
            values.update(self.validate())
        self.log_checkpoints()
        if self.jsonl:
            self.jsonl.write(self.step, values)
        if self.tensorboard:
            self.tensorboard.write(self.step, values)
        self.console.write(self.step, values)
        if self.on_report:
            self.on_report(self.step, values)
        self._tick = (time.perf_counter(), self.step)  # validation time is not training time
        return values

    def sample_grid(self, name: str) -> Path | None:
        """Rank 0 samples from the EMA; the others only help gather it under FSDP2."""
        self.parallel.gather_ema()
        if self.rank != 0:
            return None
        sc, k = self.cfg.sample, self.data.num_classes
        labels = torch.arange(k).repeat_interleave(sc.per_class)
        # eager: compiling the network for every preview grid would cost more than the grid
        images = generate(self.ema, labels, range(len(labels)), device=self.device, progress=False,
                          **{**sc.solver_settings(), "compile": "none"})
        path = self.run_dir / "samples" / name
        image = grid(images, rows=k)
        save_png(image, path)
        if self.tensorboard:
            self.tensorboard.image("samples", self.step, image.numpy())
        return path

    def save_final(self, last: dict) -> None:
        """Weights, a grid, and model.json with the final validation losses that `--weights auto`
        compares (the last report's, unless the run resumed at its end and reported nothing)."""
        losses = {k: last[k] for k in ("val_loss", "val_loss_ema")} if "val_loss" in last else self.validate()
        losses = {k: v if v is not None and math.isfinite(v) else None for k, v in losses.items()}
        ema, model = self.parallel.gather_ema().state_dict(), self.parallel.model_state()
        path = self.sample_grid("final.png")
        if self.rank != 0:
            self.barrier()
            return
        final = self.run_dir / "final"
        final.mkdir(exist_ok=True)
        for name, state in (("ema", ema), ("model", model)):
            checkpoint.write_atomic(final / f"{name}.safetensors",
                                    safetensors_bytes({k: v.contiguous() for k, v in state.items()}))
        meta = {**self.model_meta(), **losses}
        checkpoint.write_atomic(final / "model.json", json.dumps(meta, indent=2).encode())  # last: marks it whole
        self.print(f"final weights in {final}, samples in {path}")
        ema_loss, raw_loss = losses["val_loss_ema"], losses["val_loss"]
        if ema_clearly_worse(raw_loss, ema_loss):
            self.print(f"note: the EMA validates clearly worse than the raw weights (val_loss_ema {ema_loss:.4f}, "
                       f"val_loss {raw_loss:.4f}): its half-life of {self.ema_halflife() / 1000:.4g}k images still "
                       f"holds early weights after {self.images_seen / 1000:.4g}k images (a shorter "
                       f"train.ema_halflife_kimg suits a run this short); sampling takes the better by default "
                       f"(--weights auto), and --weights model chooses the raw weights")
        self.barrier()

    def model_meta(self) -> dict:
        """What sampling needs beside weights: final/model.json and every snapshot's model.json."""
        return {"format_version": FORMAT_VERSION, "preset": self.cfg.model.preset, "arch": self.net.arch.to_dict(),
                "class_names": self.data.class_names, "source": self.data.name, "step": self.step,
                "images_seen": self.images_seen, **self.distill_meta()}

    def distill_meta(self) -> dict:
        """A student's: the guidance folded into it and the teacher it learnt from."""
        if self.teacher_meta is None:
            return {}
        return {"folded_guidance": distill.folded_guidance(self.cfg),
                "distilled_from": {"run": self.cfg.distill.teacher, "weights": self.teacher_meta["weights"],
                                   "step": self.teacher_meta.get("step"), "preset": self.teacher_meta.get("preset")}}
