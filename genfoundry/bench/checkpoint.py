"""Training stall and time until durable per full checkpoint: `torch.save`, DCP `async_save`, genfoundry's tiers.

One model, its AdamW state and an EMA copy train on random images at the model's resolution; a
checkpoint of exactly what the trainer saves (`TrainerState.state_dict()`) is taken before every
`every`-th step. Each step is timed (device synchronized); a save's stall is the time of the step it
falls in (the save call and the wait before the optimizer update included) minus the median step
without a save. Durable is the time from the save call until the checkpoint is complete on disk,
fsync'd. The methods (`checkpoint_methods.py`), one after the other, each with its files removed before
the next:

- `torch_save`: `torch.save` of the state through `atomic_writer` (fsync, rename), blocking.
- `dcp_async`: `torch.distributed.checkpoint.async_save` with a `DefaultStager` (pinned host buffers
  reused across saves, staging on a side stream in a thread, no process group); training waits for
  the staging before the optimizer update.
- `dcp_async_writer`: `async_save` staged by its `FileSystemWriter` (`cache_staged_state_dict=True`).
- `genfoundry`: `CheckpointManager(asynchronous=True)` called by `TrainerState.save_checkpoint`, with
  `before_update()` before the optimizer update, as the trainer does.

Before each save the loop waits, untimed, until the previous checkpoint is durable (a run whose
checkpoint interval is longer than a write); that wait is reported as `settle_s`.

    python -m genfoundry.bench.checkpoint --out checkpoint.json              # CPU: the demo's model
    python -m genfoundry.bench.checkpoint --params 1e9 --out checkpoint.json  # one GPU: ~1B parameters
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genfoundry import accel
from genfoundry import config as config_lib
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.data.memory import InMemoryLoader
from genfoundry.diffusion import FlowMatching
from genfoundry.distributed.state import HookState, ParallelState
from genfoundry.errors import ConfigError, GenfoundryError, writable_directory
from genfoundry.models import MODELS, DiT, DiTArch
from genfoundry.progress import bar
from genfoundry.sources import ImageSet
from genfoundry.trainer.state import TrainerState
from genfoundry.bench.checkpoint_methods import LABELS, METHODS, SAVERS

DEMO_RECIPE = "demo"             # the CPU default trains this recipe's model on its data's shape
MNIST_SHAPE = (28, 1, 10)        # the demo's data: resolution, channels, classes
LATENT_SHAPE = (32, 4, 1000)     # a 256-px image as 8x-downsampled latents, ImageNet's classes
CUSTOM = dict(hidden_size=2048, num_heads=16, patch_size=2)  # --params fits the depth of this width
PRECISIONS = ("auto", "fp32", "bf16")  # fp16 would need the trainer's loss scaler
EMA_BETA = 0.999
STALL_TARGET = 20.0              # genfoundry's stall at least this many times smaller than torch.save's


def parse_arch(text: str) -> tuple[int, int, int]:
    """`--arch hidden,depth,heads` as three integers."""
    try:
        hidden, depth, heads = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--arch wants hidden,depth,heads (e.g. 2048,13,16), not '{text}'") from None
    if min(hidden, depth, heads) < 1 or hidden % heads or hidden % 4:
        raise ConfigError(f"--arch {text}: the hidden size must be a multiple of 4 and of the number of heads")
    return hidden, depth, heads


def count_parameters(arch: DiTArch) -> int:
    """Exact parameter count, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(arch).parameters())


def resolve_arch(device: torch.device, preset: str | None, params: float | None, arch: tuple | None,
                 image_size: int | None, channels: int | None, num_classes: int | None) -> tuple[DiTArch, str]:
    """The network to benchmark and a name for it. Default: the demo's preset on a CPU, ~1e9
    parameters elsewhere. A preset takes the demo's data shape, `--params`/`--arch` a latent shape."""
    if sum(v is not None for v in (preset, params, arch)) > 1:
        raise ConfigError("choose one of --preset, --params and --arch")
    if preset is None and params is None and arch is None:
        if device.type == "cpu":
            preset = config_lib.load(DEMO_RECIPE).model.preset
        else:
            params = 1e9
    size, chans, classes = MNIST_SHAPE if preset is not None else LATENT_SHAPE
    shape = dict(image_size=image_size or size, in_channels=channels or chans, num_classes=num_classes or classes)
    if preset is not None:
        if preset not in MODELS:
            raise ConfigError(f"unknown --preset '{preset}'; choose one of {sorted(MODELS)}")
        patch = MODELS[preset]["patch_size"]
        if shape["image_size"] % patch:
            raise ConfigError(f"--image-size {shape['image_size']} is not a multiple of {preset}'s patch size {patch}; "
                              f"pass --image-size {-(-shape['image_size'] // patch) * patch}")
        return DiTArch(**shape, **MODELS[preset]), preset
    if arch is not None:
        hidden, depth, heads = arch
        return DiTArch(**shape, hidden_size=hidden, depth=depth, num_heads=heads, patch_size=2), "custom"
    if params < 1e6:
        raise ConfigError(f"--params {params:g} is too small for a DiT of width {CUSTOM['hidden_size']}; "
                          f"pass at least 1e6, or a --preset")
    one, two = (count_parameters(DiTArch(**shape, **CUSTOM, depth=d)) for d in (1, 2))
    depth = max(1, round((params - (2 * one - two)) / (two - one)))
    return DiTArch(**shape, **CUSTOM, depth=depth), f"fitted to --params {params:g}"


class BenchRun(TrainerState):
    """What `TrainerState.state_dict()` and `save_checkpoint()` read, around a real model, AdamW and
    EMA, so every method saves exactly what the trainer saves, and the genfoundry method saves it the
    trainer's way."""

    def __init__(self, arch: DiTArch, device: torch.device, precision: str, batch_size: int, seed: int = 0):
        self.cfg = config_lib.Config()
        self.device, self.precision, self.rank = device, precision, 0
        torch.manual_seed(seed)
        with device:  # initialized where it trains: a 1e9-parameter init on a CPU takes long
            model = DiT(arch)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        tc = self.cfg.train
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           weight_decay=tc.weight_decay)
        self.model, self.parallel = model, ParallelState(model, self.optimizer, self.ema)
        self.hook = HookState(None, "none", 1)
        rng = np.random.default_rng(seed)
        n = 4 * batch_size  # random images at the model's shape, drawn as the trainer draws batches
        images = rng.integers(0, 256, (n, arch.image_size, arch.image_size, arch.in_channels), dtype=np.uint8)
        labels = rng.integers(0, arch.num_classes, n).astype(np.int64)
        self.loader = InMemoryLoader(ImageSet("random", images, labels, [str(c) for c in range(arch.num_classes)]),
                                     batch_size, seed, device)
        self.objective = FlowMatching()
        self.generator = torch.Generator(device).manual_seed(seed)
        self.batch_size, self.scaler, self.overflow_streak = batch_size, None, 0
        self.step = self.images_seen = 0
        self.train_time_s, self.total_steps = 0.0, self.cfg.train.steps  # what a trainer's state holds
        self.checkpoints = None

    def train_step(self, before_update) -> None:
        """Forward, backward, `before_update()`, AdamW, EMA: the trainer's step without its reports."""
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self.loader.next_batch()
        t, eps, drop = self.objective.draw(x, self.generator)
        with accel.autocast(self.device, self.precision):
            loss = self.objective.loss(self.model, x, y, t, eps, drop)
        loss.backward()
        before_update()
        self.optimizer.step()
        self.parallel.update_ema(EMA_BETA)
        self.step += 1
        self.images_seen += self.batch_size


def tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0




def save_steps(steps: int, every: int) -> list[int]:
    """The steps a save comes before: 3, 8, 13 of 15 for every=5; never the first two (they set the pace)."""
    return [s for s in range(2, steps) if (s + 2) % every == 0]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "max": max(values), "each": values}


def timed_step(run: BenchRun, before_update=lambda: None, save=None) -> tuple[float, float]:
    """Seconds of one training step (the device synchronized around it) and of the save call in it."""
    accel.synchronize(run.device)
    started = time.perf_counter()
    if save is not None:
        save()
    call = time.perf_counter() - started
    run.train_step(before_update)
    accel.synchronize(run.device)
    return time.perf_counter() - started, call


def measure(run: BenchRun, method: str, directory: Path, steps: int, every: int, warmup: int,
            progress=lambda n: None) -> dict:
    """Times `steps` training steps with a save of `method` before each step of `save_steps`; the
    method's files are removed after. `progress(1)` after each step, outside its timing."""
    at = save_steps(steps, every)
    durations, calls, settle = [], [], 0.0
    directory.mkdir()
    try:
        saver = SAVERS[method](run, directory)
        for _ in range(warmup):
            timed_step(run)
            progress(1)
        for s in range(steps):
            if s in at:
                started = time.perf_counter()
                saver.settle()
                settle += time.perf_counter() - started
            duration, call = timed_step(run, saver.before_update, saver.save if s in at else None)
            durations.append(duration)
            if s in at:
                calls.append(call)
            progress(1)
        started = time.perf_counter()
        saver.close()
        settle += time.perf_counter() - started
        durable = list(saver.durable)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    plain = [d for s, d in enumerate(durations) if s not in at]
    step_s = statistics.median(plain)
    return {"config": saver.config, "saves": len(calls), "step_s": step_s,
            # a stall below the jitter of the steps without a save cannot be told from noise
            "step_jitter_s": statistics.median(abs(d - step_s) for d in plain),
            "stall_s": summary([durations[s] - step_s for s in at]), "call_s": summary(calls),
            "durable_s": summary(durable), "settle_s": settle}


def free_host_memory(device: torch.device) -> None:
    """Returns the pinned buffers of the method just measured before the next one allocates its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # torch.accelerator.empty_host_cache is recent; older torch has only the private call.
        getattr(torch.accelerator, "empty_host_cache", torch._C._host_emptyCache)()


def compare(methods: dict) -> tuple[dict, dict]:
    """The stall ratios of the issue's targets, each stall at least its method's step jitter."""
    def stall(name: str) -> float:
        m = methods[name]
        return max(m["stall_s"]["median"], m["step_jitter_s"], 1e-6)

    ratios, targets = {}, {}
    if {"torch_save", "genfoundry"} <= set(methods):
        ratios["torch_save_over_genfoundry"] = stall("torch_save") / stall("genfoundry")
        targets[f"stall_{STALL_TARGET:g}x_smaller_than_torch_save"] = (
            ratios["torch_save_over_genfoundry"] >= STALL_TARGET)
    dcp = [name for name in ("dcp_async", "dcp_async_writer") if name in methods]
    if dcp and "genfoundry" in methods:  # against the better of the DCP configurations measured
        best = min(dcp, key=stall)
        ratios["genfoundry_over_dcp_async"] = stall("genfoundry") / stall(best)
        ratios["dcp_async_compared"] = best
        targets["stall_no_larger_than_dcp_async"] = ratios["genfoundry_over_dcp_async"] <= 1.0
    return ratios, targets


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if abs(s) < 1 else f"{s:.2f} s"


def print_table(result: dict, say) -> None:
    say(f"{'method':<17}{'stall median':>14}{'stall max':>12}{'durable median':>16}{'durable max':>13}"
        f"{'save call':>11}{'plain step':>12}{'saves':>7}")
    for name, m in result["methods"].items():
        say(f"{LABELS[name]:<17}{_seconds(m['stall_s']['median']):>14}{_seconds(m['stall_s']['max']):>12}"
            f"{_seconds(m['durable_s']['median']):>16}{_seconds(m['durable_s']['max']):>13}"
            f"{_seconds(m['call_s']['median']):>11}{_seconds(m['step_s']):>12}{m['saves']:>7}")
    for name, value in result["ratios"].items():
        if not isinstance(value, str):
            say(f"stall ratio {name.replace('_over_', ' / ')}: {value:.3g}")
    for name, met in result["targets"].items():
        say(f"target {name}: {'met' if met else 'NOT met'}")


def run(device: str = "auto", preset: str | None = None, params: float | None = None, arch: str | None = None,
        image_size: int | None = None, channels: int | None = None, num_classes: int | None = None,
        batch_size: int = 32, precision: str = "auto", steps: int = 15, every: int = 5, warmup: int = 2,
        methods=METHODS, workdir: str | None = None, out: str | None = None, print_fn=print) -> dict:
    """Measures each method (see the module docstring), prints a table and returns (and writes) the JSON.
    `arch` is "hidden,depth,heads"; the checkpoints go to a temporary directory inside `workdir`."""
    unknown = [m for m in methods if m not in SAVERS]
    if unknown:
        raise ConfigError(f"unknown --methods {' '.join(unknown)}; choose from {' '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision}; choose from {' '.join(PRECISIONS)}")
    if batch_size < 1 or warmup < 0:
        raise ConfigError(f"--batch-size {batch_size} --warmup {warmup}: a step needs an image; warm-up is >= 0")
    at = save_steps(steps, every) if every >= 1 else []
    if not at:
        raise ConfigError(f"--steps {steps} --every {every} leave no save; the default --steps 15 --every 5 "
                          f"saves before steps 3, 8 and 13")
    dev = accel.get_device(device)
    net, model_name = resolve_arch(dev, preset, params, parse_arch(arch) if arch else None,
                                   image_size, channels, num_classes)
    precision = accel.resolve_precision(precision, dev)
    bench = BenchRun(net, dev, precision, batch_size)
    bench.train_step(lambda: None)  # one real step: AdamW's moments exist and are saved
    state_bytes = tensor_bytes(bench.state_dict())
    n_params = sum(p.numel() for p in bench.model.parameters())
    parent = writable_directory(workdir, ConfigError) if workdir is not None else None
    root = Path(tempfile.mkdtemp(prefix="genfoundry-bench-checkpoint-", dir=parent))
    say = print_fn
    try:
        free = shutil.disk_usage(root).free
        if free < 2.1 * state_bytes:  # one checkpoint is kept while the next is written
            raise ConfigError(f"{root.parent} has {free / 1e9:.1f} GB free and the benchmark needs twice the "
                              f"state, {2 * state_bytes / 1e9:.1f} GB: pass a --workdir on a larger disk")
        say(f"checkpoint benchmark on {accel.device_name(dev)}, torch {torch.__version__}: DiT {model_name} "
            f"(hidden {net.hidden_size}, depth {net.depth}, heads {net.num_heads}, patch {net.patch_size}), "
            f"{n_params:,} parameters; state {state_bytes / 1e9:.3g} GB (weights, AdamW moments, EMA); "
            f"batch {batch_size} of {net.in_channels}x{net.image_size}x{net.image_size}, {precision}")
        say(f"saves before steps {', '.join(map(str, at))} of {steps}, after {warmup} warm-up step(s), in {root}")
        results, failed = {}, {}
        with bar(len(methods) * (warmup + steps), "bench checkpoint", unit="step") as shown:
            for k, method in enumerate(methods, 1):
                try:
                    results[method] = measure(bench, method, root / method, steps, every, warmup, shown.update)
                except Exception as e:  # noqa: BLE001 - a baseline that this torch cannot run is reported
                    if method == "genfoundry":
                        raise  # ours keeps its traceback
                    failed[method] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    with shown.external_write_mode():
                        say(f"{LABELS[method]}: failed on torch {torch.__version__} ({failed[method]}); left out")
                    shown.update(k * (warmup + steps) - shown.n)  # the steps it did not run
                free_host_memory(dev)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios, targets = compare(results)
    result = {"format_version": 1, "benchmark": "checkpoint", "device": accel.device_name(dev),
              "torch": torch.__version__, "model": model_name, "arch": net.to_dict(), "parameters": n_params,
              "state_bytes": state_bytes, "batch_size": batch_size, "precision": precision, "steps": steps,
              "every": every, "warmup_steps": warmup, "save_steps": at,
              "methods": results, "failed": failed, "ratios": ratios, "targets": targets,
              "notes": ["stall: the step with the save minus the median step without one, of the same method",
                        "ratios take each median stall as at least its method's step jitter (noise)",
                        "settle_s: untimed waits until the previous checkpoint was durable, before each save"]}
    print_table(result, say)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), json.dumps(result, indent=2).encode())
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `run`, for this module's command line and `genfoundry bench checkpoint`."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--preset", default=None, help=f"a DiT preset (default on a CPU: the {DEMO_RECIPE} recipe's)")
    p.add_argument("--params", type=float, default=None,
                   help=f"about this many parameters: width {CUSTOM['hidden_size']}, {CUSTOM['num_heads']} heads, "
                        f"the depth fitted (default on a GPU: 1e9)")
    p.add_argument("--arch", default=None, help="hidden,depth,heads of a custom DiT (patch 2), e.g. 2048,13,16")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"input resolution (default {MNIST_SHAPE[0]} for a preset, {LATENT_SHAPE[0]} otherwise)")
    p.add_argument("--channels", type=int, default=None,
                   help=f"input channels (default {MNIST_SHAPE[1]} for a preset, {LATENT_SHAPE[1]} otherwise)")
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"classes (default {MNIST_SHAPE[2]} for a preset, {LATENT_SHAPE[2]} otherwise)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16")
    p.add_argument("--steps", type=int, default=15, help="timed training steps per method")
    p.add_argument("--every", type=int, default=5, help="a save before every N-th step (15 and 5: steps 3, 8, 13)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each method's timed ones")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"methods to measure, in order (default: "
                                                                       f"{' '.join(METHODS)})")
    p.add_argument("--workdir", default=None, help="where the checkpoints go, in a temporary directory removed after "
                                                  "(default: the system's); it needs twice the state's size free")
    p.add_argument("--out", default=None, help="JSON file to write")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="genfoundry bench checkpoint", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(**vars(args))
    except GenfoundryError as e:  # a user mistake: its one-line message, no traceback
        print(f"genfoundry.bench.checkpoint: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
