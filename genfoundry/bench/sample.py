"""Sampling speed and quality: network passes/s, images/s and FID per solver and NFE.

Speed (`--preset`, default DiT-B/2 and DiT-XL/2): random weights at the ImageNet-256 latent shape
(32 x 32 x 4, 1,000 classes), a batch of `--batch-size` images with classifier-free guidance (both
halves in one call). It times the network's forward passes per second eager under bf16 autocast (the
path sampling took before), compiled alone (`torch.compile` of the network under autocast), and
through genfoundry's sampling path (`genfoundry.sampling.fast.SamplingNetwork`); then `generate()`
with DPM-Solver++(2M) at each `--nfe`. The baseline, in the same run: diffusers' DiTPipeline with a
`DiTTransformer2DModel` of the same size in bf16 and its DPMSolverMultistepScheduler at the same
number of steps, the VAE replaced by the identity (genfoundry's side has no VAE either).

The same network is also timed at one pass per evaluation, what a guidance-distilled network of its
size samples at, and (`--interval`) guided on part of the time range only.

Quality (`--quality`): the reference Fashion-MNIST model, trained now by the fashion-mnist recipe for
`--train-s` seconds (or an existing `--run`), scored with the convergence benchmark's protocol (5,000
samples against 10,000 references, 32 px RGB) for each solver / schedule / NFE of `--configs`, with its
images/s and network passes per image; with `--distill-s`, also its guidance-distilled student
(`distill.teacher`), scored by the configs marked model=student; and a grid of the same seeds at each
NFE (`--grid`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from genfoundry import accel
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.config import SAMPLE_COMPILE, SAMPLE_PRECISIONS
from genfoundry.errors import ConfigError

LATENT = dict(image_size=32, in_channels=4, num_classes=1000)
DEFAULT_NFE = (10, 25)
DEFAULT_CONFIGS = ("euler/uniform/50", "heun/uniform/49", "heun/uniform/31", "dpm++2m/logsnr/50", "euler/uniform/16",
                   "heun/karras/15", "dpm++2m/uniform/8", "dpm++2m/uniform/12", "dpm++2m/uniform/16",
                   "dpm++2m/logsnr/8", "dpm++2m/logsnr/12", "dpm++2m/logsnr/16", "dpm++2m/shift/8", "dpm++2m/shift/12",
                   "dpm++2m/karras/12", "dpm++2m/logsnr/12/guidance=linear", "dpm++2m/logsnr/12/guidance=cosine",
                   "dpm++2m/logsnr/12/precision=fp8")
GRID_NFE = (4, 6, 8, 12, 16, 32)


def _timed(fn, device, repeats: int, warm: int = 2) -> float:
    """Seconds per call of fn(), after `warm` untimed calls."""
    for _ in range(warm):
        fn()
    accel.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    accel.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def guided_inputs(arch, device, batch: int):
    """Random (x, t, y) for a guided batch: 2 x `batch` rows."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2 * batch, arch.in_channels, arch.image_size, arch.image_size, device=device, generator=gen)
    t = torch.rand(2 * batch, device=device, generator=gen)
    y = torch.randint(0, arch.num_classes + 1, (2 * batch,), device=device, generator=gen)
    return x, t, y


def autocast_rates(model, device, batch: int, repeats: int, compile_alone: bool = True) -> dict:
    """Forward passes per second (images through the network) of the fp32 model under bf16 autocast, eager
    and (`compile_alone`) compiled, for a guided batch of 2 x `batch`."""
    x, t, y = guided_inputs(model.arch, device, batch)

    def under_autocast(net):
        def call():
            with torch.no_grad(), accel.autocast(device, "bf16"):
                net(x, t, y)
        return call

    rates = {"eager_autocast": 2 * batch / _timed(under_autocast(model), device, repeats)}
    if compile_alone:
        compiled = torch.compile(model)
        rates["compiled_alone"] = 2 * batch / _timed(under_autocast(compiled), device, repeats)
        del compiled
        torch._dynamo.reset()
    return rates


class _IdentityVAE(torch.nn.Module):
    """Stands in for the pipeline's VAE: the latents are the output, as on genfoundry's side."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(scaling_factor=1.0)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so that the pipeline finds its device

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def decode(self, latents):
        from types import SimpleNamespace

        return SimpleNamespace(sample=latents)


def diffusers_pipeline(arch, device, dtype=torch.bfloat16):
    """DiTPipeline around a DiTTransformer2DModel of `arch`'s size (random weights, learned sigma as in
    DiT) with DPMSolverMultistepScheduler (DPM-Solver++, order 2) in its default configuration."""
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    transformer = DiTTransformer2DModel(
        num_attention_heads=arch.num_heads, attention_head_dim=arch.hidden_size // arch.num_heads,
        in_channels=arch.in_channels, out_channels=2 * arch.in_channels, num_layers=arch.depth,
        sample_size=arch.image_size, patch_size=arch.patch_size, num_embeds_ada_norm=arch.num_classes)
    pipe = DiTPipeline(transformer=transformer.to(device, dtype).eval(), vae=_IdentityVAE().to(device),
                       scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def speed(preset: str, device, batch: int, nfes, cfg_scale: float, repeats: int, baseline: bool,
          compile_alone: bool, precisions=("auto",), baseline_compiled: bool = False, interval=None,
          compiles=("auto",), print_fn=print) -> dict:
    from genfoundry.models import build_model
    from genfoundry.sampling import generate
    from genfoundry.sampling.fast import SamplingNetwork

    torch.manual_seed(0)
    model = build_model(preset, **LATENT).to(device).eval()
    flops = model.flops_per_forward()
    row = {"preset": preset, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
           "cfg_scale": cfg_scale, "shape": "32x32x4, 1000 classes", "gflops_per_pass": flops / 1e9,
           "solver": "dpm++2m, uniform grid", "images_per_s": {}, "baseline_images_per_s": {},
           "guidance_interval": list(interval) if interval else None}
    t0 = time.perf_counter()
    rates = autocast_rates(model, device, batch, repeats, compile_alone)
    row["forward_passes_per_s"] = rates
    x, t, y = guided_inputs(model.arch, device, batch)
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))
    for precision, compile_mode in [(p, c) for p in precisions for c in compiles]:
        c0 = time.perf_counter()
        net = SamplingNetwork(model, device, precision, compile_mode)
        label = net.precision if compile_mode == "auto" else f"{net.precision}-{net.mode}"
        name = f"genfoundry_{label}"
        rates[name] = 2 * batch / _timed(lambda: net(x, t, y), device, repeats)
        row.setdefault("modes", {})[name] = f"{net.precision} weights, compile {net.mode}"
        generate(net, labels, range(batch), steps=2, sampler="dpm++2m", cfg_scale=cfg_scale, batch_size=batch,
                 progress=False)  # builds the graphs
        generate(net, labels, range(batch), steps=2, sampler="dpm++2m", cfg_scale=1.0, batch_size=batch,
                 progress=False)  # and the one-pass graphs
        row.setdefault("compile_s", {})[name] = time.perf_counter() - c0  # with the timed calls above
        # guided (both halves in each call); one pass per evaluation (what a guidance-distilled network of
        # this size samples at, genfoundry.trainer.distill); guided inside the interval only
        modes = {"images_per_s": {}, "one_pass_images_per_s": {"cfg_scale": 1.0}}
        if interval:
            modes["interval_images_per_s"] = {"guidance_interval": tuple(interval)}
        for key, settings in modes.items():
            rates_now = row.setdefault(key, {})[label] = {}
            for nfe in nfes:
                seconds = _timed(lambda: generate(net, labels, range(batch), steps=nfe, sampler="dpm++2m",
                                                  batch_size=batch, progress=False,
                                                  **{"cfg_scale": cfg_scale, **settings}), device, 1, warm=0)
                rates_now[str(nfe)] = batch / seconds
        net = None  # its graphs go before the next runs
        torch._dynamo.reset()
    peak = accel.peak_flops(device, "bf16")
    if peak:
        row["mfu_bf16_peak"] = {k: v * flops / peak for k, v in rates.items()}
    print_fn(f"{preset}: forward passes/s " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()))
    if baseline:
        pipe = diffusers_pipeline(model.arch, device)
        classes = labels.tolist()
        for nfe in nfes:
            seconds = _timed(lambda: pipe(classes, guidance_scale=cfg_scale, num_inference_steps=nfe,
                                          output_type="pt"), device, 1, warm=1 if nfe == nfes[0] else 0)
            row["baseline_images_per_s"][str(nfe)] = batch / seconds
        if baseline_compiled:  # what a diffusers user gets from compiling the transformer, at the first NFE
            pipe.transformer = torch.compile(pipe.transformer)
            nfe = nfes[0]
            seconds = _timed(lambda: pipe(classes, guidance_scale=cfg_scale, num_inference_steps=nfe,
                                          output_type="pt"), device, 1, warm=1)
            row["baseline_compiled_images_per_s"] = {str(nfe): batch / seconds}
            torch._dynamo.reset()
        pipe = None
    row["wall_s"] = time.perf_counter() - t0
    for nfe in nfes:
        theirs = row["baseline_images_per_s"].get(str(nfe))
        for precision, by_nfe in row["images_per_s"].items():
            ours = by_nfe[str(nfe)]
            vs = (lambda v: f" ({v / theirs:.2f}x)") if theirs else (lambda v: "")
            line = f"{preset} NFE {nfe}: genfoundry {precision} {ours:,.1f} images/s" + (
                f", diffusers {theirs:,.1f}{vs(ours)}" if theirs else "")
            one = row["one_pass_images_per_s"][precision][str(nfe)]
            line += f"; one pass (distilled guidance) {one:,.1f}{vs(one)}"
            if interval:
                part = row["interval_images_per_s"][precision][str(nfe)]
                line += f"; guided on t in [{interval[0]:g}, {interval[1]:g}] {part:,.1f}{vs(part)}"
            print_fn(line)
    if "baseline_compiled_images_per_s" in row:
        print_fn(f"{preset} NFE {nfes[0]}: diffusers with its transformer compiled "
                 f"{row['baseline_compiled_images_per_s'][str(nfes[0])]:,.1f} images/s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _interval(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    if not sep or not 0.0 <= float(lo) <= float(hi) <= 1.0:
        raise ValueError(text)
    return float(lo), float(hi)


def _model(text: str) -> str:
    if text not in ("teacher", "student"):
        raise ValueError(text)
    return text


CONFIG_OPTIONS = {"precision": str, "guidance": str, "shift": float, "cfg": float, "interval": _interval,
                  "model": _model}
GUIDANCE_OPTIONS = ("guidance", "cfg", "interval")  # what a student, its guidance folded in, cannot change


def parse_config(text: str) -> tuple[str, str, int, dict]:
    """'solver/schedule/nfe[/key=value...]' -> (solver, schedule, steps, options); the options are
    precision=, guidance= (a guidance schedule), shift=, cfg= (the guidance weight), interval=lo-hi (guidance
    only at t in [lo, hi]) and model=teacher|student (the guidance-distilled student of --distill-s)."""
    from genfoundry.config import SAMPLE_PRECISIONS
    from genfoundry.sampling.solvers import GUIDANCE_SCHEDULES, SCHEDULES, SOLVERS, steps_for

    parts = text.split("/")
    bad = ConfigError(f"--configs takes solver/schedule/nfe[/key=value...] with a solver of {', '.join(SOLVERS)}, a "
                      f"schedule of {', '.join(SCHEDULES)} and keys {', '.join(CONFIG_OPTIONS)}, e.g. "
                      f"dpm++2m/logsnr/12/precision=fp8; got '{text}'")
    if len(parts) < 3 or parts[0] not in SOLVERS or parts[1] not in SCHEDULES or not parts[2].isdigit():
        raise bad
    options = {}
    for part in parts[3:]:
        key, _, value = part.partition("=")
        if key not in CONFIG_OPTIONS or not value:
            raise bad
        try:
            options[key] = CONFIG_OPTIONS[key](value)
        except ValueError:
            raise bad from None
    if options.get("precision", "auto") not in SAMPLE_PRECISIONS or options.get("guidance", "constant") not in \
            GUIDANCE_SCHEDULES:
        raise bad
    if options.get("model") == "student" and any(key in options for key in GUIDANCE_OPTIONS):
        raise ConfigError(f"--configs '{text}': the student's guidance is folded in (that of its teacher's [sample] "
                          f"section); {', '.join(k + '=' for k in GUIDANCE_OPTIONS)} are for the teacher")
    return parts[0], parts[1], steps_for(parts[0], int(parts[2])), options


def reference_model(run: str | None, train_s: float, device, root: str, print_fn=print):
    """The EMA of `run`, or of a fashion-mnist recipe run trained now for `train_s` seconds; with its
    model.json, its [sample] section and its run directory."""
    from genfoundry import api
    from genfoundry import config as config_lib

    if run is None:
        cfg = config_lib.load("fashion-mnist", {"train.steps": 10**9, "train.time_budget_s": train_s,
                                                "train.sample_every": 0, "checkpoint.full_every": 0,
                                                "train.tensorboard": False, "run.root": root, "run.name": "reference",
                                                "run.device": str(device)})
        t0 = time.perf_counter()
        api.train(cfg, print_fn=lambda *a, **k: None)
        print_fn(f"reference model: fashion-mnist recipe, {train_s:g} s of training ({time.perf_counter() - t0:.0f} s "
                 f"wall clock)")
        run = str(api.run_dir_of(cfg))
    model, meta = api.load_trained(run, "ema", str(device), print_fn=lambda *a: None)
    return model, meta, api.run_config(run).sample, run


def distilled_model(teacher_run: str, distill_s: float, lr: float, device, root: str, print_fn=print):
    """The EMA of a student of `teacher_run`, distilled now for `distill_s` seconds of training with the
    teacher's own config (data, model, batch, [sample] guidance) at peak learning rate `lr`."""
    from genfoundry import api
    from genfoundry import config as config_lib

    cfg = config_lib.load(str(Path(teacher_run) / "config.toml"), {
        "distill.teacher": str(teacher_run), "distill.weights": "ema", "train.steps": 10**9,
        "train.time_budget_s": distill_s, "train.lr": lr, "train.warmup_steps": 100, "train.ema_halflife_kimg": 50.0,
        "train.sample_every": 0, "train.report_every": 0, "checkpoint.full_every": 0, "train.tensorboard": False,
        "run.root": root, "run.name": "student", "run.device": str(device)})
    t0 = time.perf_counter()
    api.train(cfg, print_fn=lambda *a, **k: None)
    model, meta = api.load_trained(api.run_dir_of(cfg), "ema", str(device), print_fn=lambda *a: None)
    print_fn(f"student: guidance {meta['folded_guidance']} folded in over {distill_s:g} s of training, "
             f"{meta['step']} steps ({time.perf_counter() - t0:.0f} s wall clock)")
    return model, meta


def quality(run, train_s, configs, device, samples: int, references: int, grid_path, grid_solver: str,
            print_fn=print, result: dict | None = None, saved=lambda: None, distill_s: float = 0.0,
            distill_lr: float = 1e-4) -> dict:
    from genfoundry.api import balanced_labels
    from genfoundry.bench.convergence import Protocol
    from genfoundry.sampling import generate
    from genfoundry.sampling.fast import SamplingNetwork
    from genfoundry.sampling.solvers import SOLVERS

    result = {} if result is None else result
    protocol = Protocol(device, samples, references)
    with tempfile.TemporaryDirectory(prefix="genfoundry-bench-sample-") as root:
        model, meta, sc, teacher_run = reference_model(run, train_s, device, root, print_fn)
        models = {"teacher": model}
        if distill_s:
            models["student"], student_meta = distilled_model(teacher_run, distill_s, distill_lr, device, root, print_fn)
            result["student"] = {"distill_s": distill_s, "lr": distill_lr, "step": student_meta["step"],
                                 "folded_guidance": student_meta["folded_guidance"]}
    nets = {("teacher", sc.precision): SamplingNetwork(model, device, sc.precision, sc.compile)}
    net = nets[("teacher", sc.precision)]
    k = len(meta["class_names"])
    labels = balanced_labels(samples, k)
    settings = dict(cfg_scale=sc.cfg_scale, guidance_interval=(sc.guidance_min_t, sc.guidance_max_t), seed=sc.seed,
                    guidance_schedule=sc.guidance_schedule, batch_size=sc.batch_size, progress=False)
    result.update(protocol=protocol.describe(), model={"run": run or f"fashion-mnist recipe, {train_s:g} s",
                                                       "step": meta["step"], "arch": meta["arch"]},
                  network=f"{net.precision} weights, compile {net.mode}", cfg_scale=sc.cfg_scale, rows=[])

    def network(which: str, precision: str):
        key = (which, precision)
        if key not in nets:
            nets[key] = SamplingNetwork(models[which], device, precision, sc.compile)
        if not getattr(nets[key], "warm", False):
            warm = min(samples, sc.batch_size)
            for scale in {settings["cfg_scale"], 1.0}:  # the graphs of both batch shapes (guided, one pass)
                generate(nets[key], labels[:warm], range(warm), steps=2, sampler="euler",
                         **{**settings, "cfg_scale": scale} if which == "teacher" else settings)
            nets[key].warm = True
        return nets[key]

    for text in configs:
        solver, schedule, steps, options = parse_config(text)
        which = options.get("model", "teacher")  # run() checked that a student is asked for with --distill-s
        use = network(which, options.get("precision", sc.precision))
        run_settings = {**settings, "cfg_scale": options.get("cfg", sc.cfg_scale),
                        "guidance_interval": options.get("interval", settings["guidance_interval"]),
                        "guidance_schedule": options.get("guidance", sc.guidance_schedule)}
        accel.synchronize(device)
        rows_before, t0 = use.rows, time.perf_counter()
        images = generate(use, labels, range(samples), steps=steps, sampler=solver, schedule=schedule,
                          shift=options.get("shift", sc.shift), **run_settings)
        sample_s = time.perf_counter() - t0
        evaluated = -(-samples // sc.batch_size) * sc.batch_size if use.fixed_shapes else samples  # with padding
        fid = protocol.fid(images)
        row = {"config": text, "model": which, "solver": solver, "schedule": schedule, "steps": steps,
               "nfe": SOLVERS[solver].evaluations(steps), "precision": use.precision,
               "guidance_schedule": run_settings["guidance_schedule"], "cfg_scale": run_settings["cfg_scale"],
               "guidance_interval": list(run_settings["guidance_interval"]),
               "passes_per_image": (use.rows - rows_before) / evaluated, "fid": fid,
               "images_per_s": samples / sample_s}
        result["rows"].append(row)
        print_fn(f"{text:44s} NFE {row['nfe']:3d} ({row['passes_per_image']:g} passes): FID {fid:7.2f}, "
                 f"{row['images_per_s']:,.0f} images/s", flush=True)
        saved()
    if grid_path:
        result["grid"] = {"path": str(grid_path), "solver": grid_solver, "nfe": list(GRID_NFE)}
        draw_grid(net, k, grid_solver, settings, grid_path)
        print_fn(f"grid: {grid_path}")
    return result


def draw_grid(net, num_classes: int, solver_schedule: str, settings: dict, path) -> None:
    """One row per NFE of GRID_NFE, the same seeds and labels (two per class) in every row."""
    import numpy as np
    from PIL import Image, ImageDraw

    from genfoundry.sampling import generate, grid, save_png
    from genfoundry.sampling.solvers import steps_for

    solver, schedule = solver_schedule.split("/")
    labels = torch.arange(num_classes).repeat(2)
    rows = []
    for nfe in GRID_NFE:
        images = generate(net, labels, range(len(labels)), steps=steps_for(solver, nfe), sampler=solver,
                          schedule=schedule, **settings)
        rows.append(grid(images, rows=1).numpy())
    body = np.concatenate(rows, axis=0)
    body = np.repeat(np.repeat(body, 3, axis=0), 3, axis=1)  # 3x, so that the digits read on a page
    if body.shape[2] == 1:
        body = np.repeat(body, 3, axis=2)
    margin = 70
    canvas = Image.new("RGB", (body.shape[1] + margin, body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = body.shape[0] // len(GRID_NFE)
    for i, nfe in enumerate(GRID_NFE):
        draw.text((6, i * row_h + row_h // 2 - 6), f"NFE {nfe}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(torch.from_numpy(np.asarray(canvas)), path)


def run(presets=("DiT-B/2", "DiT-XL/2"), batch: int = 256, nfes=DEFAULT_NFE, cfg_scale: float = 1.5,
        repeats: int = 10, baseline: bool = True, compile_alone: bool = True, precisions=("auto",), compiles=("auto",),
        baseline_compiled: bool = False, quality_run: str | None = None,
        do_quality: bool = False, train_s: float = 150.0, configs=DEFAULT_CONFIGS, samples: int = 5000,
        references: int = 10000, grid_path: str | None = None, grid_solver: str = "dpm++2m/uniform",
        device: str = "auto", out: str | None = None, print_fn=print, interval=None, distill_s: float = 0.0,
        distill_lr: float = 1e-4) -> dict:
    dev = accel.get_device(device)
    for text in configs if do_quality else ():
        if parse_config(text)[3].get("model") == "student" and not distill_s:  # a typo fails before any work
            raise ConfigError(f"--configs '{text}' scores the student: give --distill-s (its distillation seconds)")
    result = {"format_version": 1, "benchmark": "sample", "device": accel.device_name(dev), "torch": torch.__version__,
              "speed": [], "quality": None}

    def save():
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(out), json.dumps(result, indent=2).encode())

    for preset in presets:
        result["speed"].append(speed(preset, dev, batch, nfes, cfg_scale, repeats, baseline, compile_alone, precisions,
                                     baseline_compiled, interval, compiles, print_fn))
        save()
    if do_quality:
        result["quality"] = {}
        quality(quality_run, train_s, configs, dev, samples, references, grid_path, grid_solver, print_fn,
                result["quality"], save, distill_s, distill_lr)
    elif grid_path:  # the grid alone, of an existing run
        from genfoundry.sampling.fast import SamplingNetwork

        if quality_run is None:
            raise ConfigError("--grid without --quality draws an existing run's samples: give --run")
        model, meta, sc, _ = reference_model(quality_run, train_s, dev, "", print_fn)
        settings = dict(cfg_scale=sc.cfg_scale, guidance_interval=(sc.guidance_min_t, sc.guidance_max_t),
                        seed=sc.seed, batch_size=sc.batch_size, progress=False)
        draw_grid(SamplingNetwork(model, dev, sc.precision, sc.compile), len(meta["class_names"]), grid_solver,
                  settings, grid_path)
        result["grid"] = {"path": str(grid_path), "run": quality_run, "solver": grid_solver, "nfe": list(GRID_NFE)}
        print_fn(f"grid: {grid_path}")
    save()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="genfoundry bench sample", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="network for the speed part, repeatable (default: DiT-B/2 and "
                                                     "DiT-XL/2); --no-speed skips it")
    p.add_argument("--no-speed", action="store_true", help="skip the speed part")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch, guided (default: 256)")
    p.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFE)),
                   help="solver steps for the images/s of generate() and the baseline, comma-separated "
                        "(default: 10,25)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance weight of the speed part (default: 1.5)")
    p.add_argument("--repeats", type=int, default=10, help="timed network calls per forward-pass rate (default: 10)")
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers pipeline")
    p.add_argument("--no-compile-alone", action="store_true", help="skip the compiled-alone network rate")
    p.add_argument("--precision", action="append", choices=list(SAMPLE_PRECISIONS),
                   help="sampling precision of genfoundry's side, repeatable (default: auto; fp8 needs a GPU of "
                        "compute capability 8.9 or later)")
    p.add_argument("--compile", action="append", choices=list(SAMPLE_COMPILE),
                   help="sampling compile mode of genfoundry's side, repeatable (default: auto, CUDA graphs on a GPU)")
    p.add_argument("--interval", help="also time guidance on t in [LO, HI] only, as LO-HI (e.g. 0.1-0.7)")
    p.add_argument("--baseline-compiled", action="store_true",
                   help="also time the diffusers pipeline with its transformer compiled, at the first --nfe")
    p.add_argument("--quality", action="store_true", help="also the FID part on the reference Fashion-MNIST model")
    p.add_argument("--run", help="score this run's EMA instead of training the reference model")
    p.add_argument("--train-s", type=float, default=150.0,
                   help="training seconds of the reference model (default: 150)")
    p.add_argument("--distill-s", type=float, default=0.0,
                   help="also distill the reference model's guidance into a student for this many seconds of "
                        "training, scored by the configs with model=student (default: 0, none)")
    p.add_argument("--distill-lr", type=float, default=1e-4,
                   help="the student's train.lr (scaled as the teacher's config scales it; default: 1e-4)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="solver/schedule/nfe[/key=value...] to score, comma-separated, with keys precision=, "
                        "guidance= (a guidance schedule), shift=, cfg=, interval=LO-HI and model=teacher|student "
                        "(default: euler, heun and dpm++2m on every schedule at 8 to 50 evaluations, two guidance "
                        "schedules and fp8)")
    p.add_argument("--samples", type=int, default=5000, help="generated images per FID (default: 5000)")
    p.add_argument("--references", type=int, default=10000, help="reference images (default: 10000)")
    p.add_argument("--grid", help="write a grid of the same seeds at each NFE to this PNG (of the reference model "
                                  "with --quality, else of --run)")
    p.add_argument("--grid-solver", default="dpm++2m/uniform",
                   help="solver/schedule of the grid (default: dpm++2m/uniform)")
    p.add_argument("--device", default="auto", help="device (default: auto)")
    p.add_argument("--out", default="benchmarks/results/sample.json", help="JSON results")
    args = p.parse_args(argv)
    try:
        nfes = [int(n) for n in args.nfe.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--nfe takes integers separated by commas, got '{args.nfe}'") from None
    if not nfes or min(nfes) < 1 or args.batch_size < 1 or args.repeats < 1:
        raise ConfigError("--nfe, --batch-size and --repeats must be positive")
    presets = [] if args.no_speed else (args.preset or ["DiT-B/2", "DiT-XL/2"])
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    interval = None
    if args.interval:
        try:
            interval = _interval(args.interval)
        except ValueError:
            raise ConfigError(f"--interval takes LO-HI with 0 <= LO <= HI <= 1, got '{args.interval}'") from None
    if args.distill_s < 0 or args.distill_lr <= 0:
        raise ConfigError("--distill-s must be 0 or more and --distill-lr positive")
    return run(presets, args.batch_size, nfes, args.cfg_scale, args.repeats, not args.no_baseline,
               not args.no_compile_alone, args.precision or ["auto"], args.compile or ["auto"], args.baseline_compiled,
               args.run, args.quality, args.train_s, configs, args.samples, args.references, args.grid,
               args.grid_solver, args.device, args.out, interval=interval, distill_s=args.distill_s,
               distill_lr=args.distill_lr)
