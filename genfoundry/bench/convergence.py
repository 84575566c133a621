"""Time to a good model: train for a wall-clock budget, score FID at marks of training time.

The protocol (Fashion-MNIST on one accelerator): the training set's 60,000 images; FID of
`--samples` (5,000) generated images against `--references` (10,000) images drawn once (seed 0) from
the first 30,000 training images, which both sides train on; 28-px images padded to 32 with black
and repeated to RGB on both sides (`ddpm_baseline.pad_to_rgb32`); TF-Inception pool3 features
(genfoundry.features). Training time counts only training: the clock stops while a mark's samples
are drawn and scored. The floor is FID of real images against the same references: `--samples`
held-out test images, and as many training images from outside the reference pool.

genfoundry trains a recipe (`--recipe`, class-conditional and/or unconditional) through its own
trainer with `train.time_budget_s` set to the last mark, so the learning-rate schedule spans the
budget; the baseline is diffusers' own DDPM recipe (`ddpm_baseline`), on the same data and device,
one after the other.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genfoundry import accel
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.errors import ConfigError

DEFAULT_MARKS = (100.0, 200.0, 400.0)
DEFAULT_TARGETS = (60.0, 30.0, 15.0, 10.0, 7.0)
REFERENCE_POOL = 30000


class Protocol:
    """The reference statistics and the scoring of generated images against them."""

    def __init__(self, device, samples: int = 5000, references: int = 10000, pool: int = REFERENCE_POOL,
                 batch_size: int = 500):
        from genfoundry.bench.ddpm_baseline import pad_to_rgb32
        from genfoundry.features import InceptionFeatures
        from genfoundry.sources import load_images

        if references > pool:
            raise ConfigError(f"--references ({references}) must be at most the pool of the first {pool} images")
        self.pad = pad_to_rgb32
        self.samples, self.references, self.pool = samples, references, pool
        self.train = load_images("fashion-mnist", "train")
        if samples > len(self.train) - pool:
            raise ConfigError(f"--samples ({samples}) is more than the held-out images the floor is measured on")
        self.features = InceptionFeatures(device, batch_size)
        pick = np.sort(np.random.default_rng(0).choice(pool, references, replace=False))
        t0 = time.perf_counter()
        self.mu, self.sigma, _ = self._stats(self.train.images[pick])
        self.reference_s = time.perf_counter() - t0

    def _stats(self, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats = self.features(self.pad(images).numpy())
        return feats.mean(0), np.cov(feats, rowvar=False), feats

    def fid(self, images) -> float:
        """FID of uint8 images [N, H, W, C] (C 1 or 3, at most 32 px) against the references."""
        from genfoundry.features import frechet_distance

        mu, sigma, feats = self._stats(images)
        return float(frechet_distance(mu, sigma, self.mu, self.sigma, features1=feats))

    def floor(self) -> dict:
        from genfoundry.sources import load_images

        n = self.samples
        return {"test_images": self.fid(load_images("fashion-mnist", "test").images[:n]),
                "other_training_images": self.fid(self.train.images[self.pool:self.pool + n])}

    def describe(self) -> dict:
        from genfoundry.features import network_sha256

        return {"dataset": "fashion-mnist", "train_images": len(self.train), "samples": self.samples,
                "references": self.references, "reference_pool": f"first {self.pool} training images",
                "preprocess": "28 px padded to 32 with black, grey repeated to RGB",
                "network": "tf-inception-v3 pool3", "network_sha256": network_sha256(),
                "reference_s": self.reference_s}


def time_to(points: list[dict], target: float) -> float | None:
    """Training seconds of the first mark whose FID is at most `target` (None: never reached)."""
    return next((p["train_s"] for p in points if p["fid"] <= target), None)


def genfoundry_curve(protocol: Protocol, recipe: str, overrides: dict, conditional: bool, marks, root: str,
                     print_fn=print, curve: dict | None = None, saved=lambda: None) -> dict:
    """One run of `recipe` for the last mark's training time, scored at every mark."""
    import dataclasses

    from genfoundry import config as config_lib
    from genfoundry.data.build import training_data
    from genfoundry.sampling import generate
    from genfoundry.api import balanced_labels
    from genfoundry.trainer import Trainer

    name = "genfoundry-" + ("conditional" if conditional else "unconditional")
    cfg = config_lib.load(recipe, {"train.steps": 10**9, "checkpoint.full_every": 0, "train.sample_every": 0,
                                   "train.report_every": 0, "train.tensorboard": False, **overrides,
                                   "run.root": root, "run.name": name, "data.source": "fashion-mnist",
                                   "train.time_budget_s": max(marks)})
    tc, sc = cfg.train, cfg.sample
    device = accel.get_device(cfg.run.device)
    data = training_data(cfg.data, tc.global_batch_size, tc.val_batch_size, cfg.run.seed, device)
    if not conditional:
        from genfoundry.data.memory import InMemoryLoader

        train = dataclasses.replace(protocol.train, labels=np.full(len(protocol.train), -1, dtype=np.int64), class_names=[])
        data = dataclasses.replace(
            data, class_names=[], val_labels=np.full(len(data.val_labels), -1, dtype=np.int64),
            make_loader=lambda r, w, a: InMemoryLoader(train, tc.global_batch_size, cfg.run.seed, device, False,
                                                       r, w, a))
    pending = sorted(marks)
    curve = {} if curve is None else curve
    curve.update(name=name, recipe=recipe, config=config_lib.to_dict(cfg), points=[], conditional=conditional,
                 cfg_scale=sc.cfg_scale if conditional else 1.0, sampler=f"{sc.sampler} {sc.steps} steps")
    points = curve["points"]
    trainer = None

    def at_report(step: int, values: dict) -> None:
        passed = [m for m in pending if trainer.train_time_s >= m - 1e-6 or step >= trainer.total_steps]
        if passed:  # one evaluation for every mark this report has passed
            del pending[:len(passed)]
            mark = passed[-1]
            t0 = time.perf_counter()
            k = trainer.data.num_classes
            labels = balanced_labels(protocol.samples, k) if conditional else torch.full((protocol.samples,), k)
            settings = {**sc.solver_settings(), "cfg_scale": sc.cfg_scale if conditional else 1.0}
            images = generate(trainer.ema, labels, range(protocol.samples), device=device, progress=False, **settings)
            sample_s = time.perf_counter() - t0
            fid = protocol.fid(images)
            points.append({"mark_s": mark, "train_s": trainer.train_time_s, "step": step,
                           "images_seen": trainer.images_seen, "fid": fid, "images_per_s": values.get("images_per_s"),
                           "sample_s": sample_s, "score_s": time.perf_counter() - t0 - sample_s})
            print_fn(f"{name}: {trainer.train_time_s:.1f} s of training, step {step}, "
                     f"{trainer.images_seen / 1e6:.2f}M images: FID {fid:.2f}", flush=True)
            saved()

    trainer = Trainer(cfg, print_fn=lambda *a, **k: None, data=data, on_report=at_report)
    t0 = time.perf_counter()
    trainer.train()
    curve.update(wall_s=time.perf_counter() - t0, total_steps=trainer.step)
    return curve


def ddpm_curve(protocol: Protocol, marks, device, batch_size: int = 128, scheduler: str = "ddim",
               inference_steps: int = 100, print_fn=print, curve: dict | None = None, saved=lambda: None,
               tiny: bool = False) -> dict:
    """diffusers' DDPM recipe trained on the padded images, scored at every mark (`tiny`: its small
    network, for tests)."""
    from genfoundry.bench.ddpm_baseline import DDPMBaseline

    dev = accel.get_device(device)
    baseline = DDPMBaseline(protocol.pad(protocol.train.images), dev, batch_size=batch_size, tiny=tiny)
    curve = {} if curve is None else curve
    curve.update(name="diffusers-ddpm", recipe=baseline.recipe, points=[], conditional=False,
                 sampler=f"{scheduler} {inference_steps} steps")
    points, used = curve["points"], 0.0
    t0 = time.perf_counter()
    for mark in sorted(marks):
        if mark > used:
            used = baseline.train_for(mark - used)["total_train_s"]
        s0 = time.perf_counter()
        images = baseline.sample(protocol.samples, seed=0, inference_steps=inference_steps, scheduler=scheduler)
        sample_s = time.perf_counter() - s0
        fid = protocol.fid(images)
        points.append({"mark_s": mark, "train_s": used, "fid": fid, "sample_s": sample_s,
                       "score_s": time.perf_counter() - s0 - sample_s})
        print_fn(f"diffusers-ddpm: {used:.1f} s of training: FID {fid:.2f} (sampling {sample_s:.0f} s)", flush=True)
        saved()
    curve["wall_s"] = time.perf_counter() - t0
    return curve


def summarize(result: dict, targets=DEFAULT_TARGETS) -> dict:
    """Time to each target FID for every curve, and the speed-up over the baseline where both reach it."""
    table = {c["name"]: {str(t): time_to(c["points"], t) for t in targets} for c in result["curves"] if c}
    base = next((c for c in result["curves"] if c.get("name") == "diffusers-ddpm"), None)
    if base and base["points"]:
        final = base["points"][-1]
        for c in result["curves"]:
            if c is not base and c.get("points"):
                c["time_to_baseline_final_fid"] = time_to(c["points"], final["fid"])
    return table


def plot(result: dict, path: str | Path) -> Path:
    """FID against training time (log-log) for every curve, with the floor; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for c in [c for c in result["curves"] if c.get("points")]:
        xs, ys = [p["train_s"] for p in c["points"]], [p["fid"] for p in c["points"]]
        ax.plot(xs, ys, marker="o", label=f"{c['name']} ({c['sampler']})")
    floor = (result.get("floor") or {}).get("test_images")
    if floor:
        ax.axhline(floor, color="grey", linestyle="--", label=f"floor: real held-out images ({floor:.1f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(f"FID ({result['protocol']['samples']} samples)")
    ax.set_title(f"Fashion-MNIST, {result['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(recipe: str = "fashion-mnist", variants=("conditional", "unconditional"), marks=DEFAULT_MARKS,
        baseline: bool = True, overrides: dict | None = None, samples: int = 5000, references: int = 10000,
        device: str = "auto", baseline_batch: int = 128, baseline_scheduler: str = "ddim",
        baseline_steps: int = 100, baseline_first: bool = False, out: str | None = None,
        png: str | None = None, floor: bool = True, print_fn=print) -> dict:
    dev = accel.get_device(device)
    protocol = Protocol(dev, samples, references)
    result = {"format_version": 1, "benchmark": "convergence", "device": accel.device_name(dev),
              "torch": torch.__version__, "marks_s": list(marks), "protocol": protocol.describe(),
              "floor": protocol.floor() if floor else None, "curves": []}
    if floor:
        print_fn(f"floor: {samples} real test images FID {result['floor']['test_images']:.2f}, {samples} other "
                 f"training images {result['floor']['other_training_images']:.2f}")

    def save():
        result["time_to_fid"] = summarize(result)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(out), json.dumps(result, indent=2).encode())

    def run_baseline():
        result["curves"].append({})
        ddpm_curve(protocol, marks, dev, baseline_batch, baseline_scheduler, baseline_steps, print_fn,
                   result["curves"][-1], save)
        save()

    if baseline and baseline_first:
        run_baseline()
    with tempfile.TemporaryDirectory(prefix="genfoundry-convergence-") as root:
        for variant in variants:
            result["curves"].append({})
            genfoundry_curve(protocol, recipe, {"run.device": str(dev), **(overrides or {})},
                             variant == "conditional", marks, root, print_fn, result["curves"][-1], save)
            save()
            if dev.type == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    if baseline and not baseline_first:
        run_baseline()
    save()
    for name, row in result["time_to_fid"].items():
        print_fn(f"time to FID {name}: " + ", ".join(f"<= {t}: {'-' if s is None else f'{s:.0f} s'}"
                                                      for t, s in row.items()))
    if png:
        print_fn(f"plot: {plot(result, png)}")
    return result


def main(argv: list[str] | None = None) -> dict:
    from genfoundry import config as config_lib

    p = argparse.ArgumentParser(prog="genfoundry bench convergence", description=__doc__.splitlines()[0],
                                epilog="Other arguments are config overrides of the genfoundry recipe "
                                       "(--section.key=value), e.g. --train.lr=2e-3.")
    p.add_argument("--recipe", default="fashion-mnist", help="genfoundry recipe (default: fashion-mnist)")
    p.add_argument("--variant", action="append", choices=["conditional", "unconditional"],
                   help="repeatable (default: both)")
    p.add_argument("--marks", default=",".join(f"{m:g}" for m in DEFAULT_MARKS),
                   help="training seconds at which FID is scored, comma-separated (default: 100,200,400)")
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers DDPM recipe")
    p.add_argument("--baseline-only", action="store_true", help="only the diffusers DDPM recipe")
    p.add_argument("--baseline-first", action="store_true", help="train the baseline before genfoundry")
    p.add_argument("--baseline-batch", type=int, default=128, help="the baseline's batch (default: 128)")
    p.add_argument("--baseline-sampler", choices=["ddpm", "ddim"], default="ddim",
                   help="the baseline's sampler (default: ddim; the example's own is ddpm with 1000 steps)")
    p.add_argument("--baseline-steps", type=int, default=100, help="the baseline's sampling steps (default: 100)")
    p.add_argument("--samples", type=int, default=5000, help="generated images per FID (default: 5000)")
    p.add_argument("--references", type=int, default=10000, help="reference images (default: 10000)")
    p.add_argument("--device", default="auto", help="device (default: auto)")
    p.add_argument("--out", default="benchmarks/results/convergence.json", help="JSON results")
    p.add_argument("--no-floor", action="store_true", help="skip the floor (FID of real held-out images)")
    p.add_argument("--png", help="also plot the curves to this PNG (needs matplotlib)")
    p.add_argument("--plot", metavar="JSON", help="only plot an earlier run's JSON to --png")
    args, rest = p.parse_known_args(argv)
    if args.plot:
        if not args.png:
            raise ConfigError("--plot needs --png, the file to draw to")
        result = json.loads(Path(args.plot).read_text())
        print(f"plot: {plot(result, args.png)}")
        return result
    try:
        marks = [float(m) for m in args.marks.split(",") if m.strip()]
    except ValueError:
        raise ConfigError(f"--marks takes seconds separated by commas, got '{args.marks}'") from None
    if not marks or min(marks) <= 0:
        raise ConfigError(f"--marks must be positive seconds, got '{args.marks}'")
    if args.samples < 2 or args.references < 2:
        raise ConfigError("--samples and --references must be at least 2")
    variants = [] if args.baseline_only else (args.variant or ["conditional", "unconditional"])
    return run(args.recipe, variants, marks, not args.no_baseline, config_lib.parse_overrides(rest), args.samples,
               args.references, args.device, args.baseline_batch, args.baseline_sampler, args.baseline_steps,
               args.baseline_first, args.out, args.png, not args.no_floor)
