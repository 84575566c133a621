"""Training throughput and MFU of a DiT preset on random inputs, against a measured matmul ceiling.

FLOPs are 2 x multiply-adds, a training step is 3 x the forward pass (DiT.flops_per_forward).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from genfoundry import accel, metrics
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.diffusion import FlowMatching
from genfoundry.models import build_model
from genfoundry.progress import bar


def _timer(device: torch.device):
    """A function that runs `fn` once and returns its wall time in seconds, with device syncs around it."""
    def run(fn) -> float:
        accel.synchronize(device)
        t0 = time.perf_counter()
        fn()
        accel.synchronize(device)
        return time.perf_counter() - t0
    return run


def matmul_ceiling(device: torch.device, precision: str = "bf16", n: int = 8192, repeats: int = 20) -> float:
    """Measured FLOP/s of a large square matrix product in the given precision (median of repeats)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu":
        n, repeats = 1024, 5
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    time_it = _timer(device)
    for _ in range(3):
        a @ b
    times = [time_it(lambda: a @ b) for _ in range(repeats)]
    return 2 * n**3 / statistics.median(times)


def plain_step(model, batch_size: int, num_images: int, precision: str, compile: str, cuda_graphs: bool,
               dev: torch.device):
    """The baseline: a plain PyTorch loop doing the trainer's work the way a careful user writes it.

    Images held on the device and gathered by a random permutation, batched noise from one generator,
    flow-matching loss, fused AdamW where the device has it, gradient clipping to 1, an EMA of the
    weights; DDP on several ranks; `compile` other than "none" compiles the whole model
    (mode reduce-overhead with `cuda_graphs`). No sync with the host inside a step."""
    arch = model.arch
    objective = FlowMatching()
    gen = torch.Generator(dev).manual_seed(accel.rank())
    images = torch.randint(0, 256, (num_images, arch.in_channels, arch.image_size, arch.image_size),
                           dtype=torch.uint8, device=dev)
    labels = torch.randint(0, arch.num_classes, (num_images,), device=dev)
    net = model
    if accel.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if compile != "none":
        net = torch.compile(net, mode="reduce-overhead" if cuda_graphs else None)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if dev.type == "cuda" else {}))
    order = [torch.randperm(num_images, device=dev, generator=gen), 0]

    def step():
        if order[1] + batch_size > num_images:
            order[:] = [torch.randperm(num_images, device=dev, generator=gen), 0]
        idx = order[0][order[1]:order[1] + batch_size]
        order[1] += batch_size
        x = images[idx].float().div_(127.5).sub_(1.0)
        t, eps, drop = objective.draw(x, gen)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with accel.autocast(dev, precision):
            loss = objective.loss(net, x, labels[idx], t, eps, drop)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-3)

    return step


def build_step(impl: str, preset: str, image_size: int, channels: int, num_classes: int, batch_size: int,
               precision: str, compile: str, dev: torch.device, cuda_graphs: bool = False, root: str = ""):
    """A function running one training step of `batch_size` images per rank, and the model.

    impl "genfoundry": the product's own step, `Trainer.train_step`, on synthetic images held as a
    named dataset is (loader, keyed noise, clipping, the fused optimizer's on-device skip, EMA, metrics,
    `parallel.compile` with `compile_scope` as `compile` says). impl "baseline": `plain_step`.
    """
    num_images = max(4 * batch_size * accel.world_size(), 4096)
    if impl == "baseline":
        torch.manual_seed(0)
        model = build_model(preset, image_size, channels, num_classes).to(dev)
        return plain_step(model, batch_size, num_images, precision, compile, cuda_graphs, dev), model
    from genfoundry import config as config_lib
    from genfoundry.data.build import synthetic_data
    from genfoundry.trainer import Trainer

    world = accel.world_size()
    cfg = config_lib.load(None, {
        "run.root": root, "run.name": "bench-train", "run.device": str(dev), "model.preset": preset,
        "train.global_batch_size": batch_size * world, "train.micro_batch_size": batch_size,
        "train.precision": precision, "train.steps": 10**9, "train.warmup_steps": 0, "train.lr": 1e-4,
        "train.tensorboard": False, "parallel.compile": compile != "none",
        "parallel.compile_scope": "loss" if compile == "loss" else "blocks", "parallel.cuda_graphs": cuda_graphs})
    data = synthetic_data(image_size, channels, num_classes, num_images, batch_size * world, 0, dev)
    trainer = Trainer(cfg, print_fn=lambda *a, **k: None, data=data)

    def step():
        trainer.train_step()
        if trainer.step % 100 == 0:  # what the trainer's report does every train.log_every steps
            trainer.read_step_flags()
            metrics.collect()

    return step, trainer.net


def train_throughput(preset: str = "DiT-B/2", image_size: int = 32, channels: int = 4, num_classes: int = 1000,
                     batch_size: int = 256, precision: str = "bf16", compile: str = "blocks", warmup: int = 10,
                     steps: int = 30, device: str = "auto", impl: str = "genfoundry", profile: bool = False,
                     cuda_graphs: bool = False, root: str = "") -> dict:
    """Images/s of full training steps (forward, backward, clipping, AdamW, EMA) over all ranks."""
    dev = accel.get_device(device)
    step, model = build_step(impl, preset, image_size, channels, num_classes, batch_size, precision, compile, dev,
                             cuda_graphs, root)
    flops_fwd = model.flops_per_forward()
    time_it = _timer(dev)
    compile_s = sum(time_it(step) for _ in range(warmup))
    accel.reset_peak_memory(dev)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    elapsed = time_it(lambda: [step() for _ in range(steps)])
    kernels = profile_kernels(step, dev) if profile else None
    world = accel.world_size()
    ips = steps * batch_size * world / elapsed
    achieved = ips * 3 * flops_fwd
    peak = accel.peak_flops(dev, precision)
    peak = peak * world if peak else None
    memory = accel.max_memory_allocated(dev)
    return {
        "preset": preset, "impl": impl, "timed": "Trainer.train_step" if impl == "genfoundry" else "plain_step", "input": [channels, image_size, image_size], "tokens": model.arch.num_tokens,
        "world_size": world, "batch_size_per_rank": batch_size, "precision": precision,
        "compile": compile, "cuda_graphs": cuda_graphs, "device": accel.device_name(dev),
        "torch": torch.__version__, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_per_forward": flops_fwd / 1e9, "images_per_s": ips, "achieved_tflops": achieved / 1e12,
        "datasheet_peak_tflops": peak / 1e12 if peak else None,
        "mfu_datasheet": achieved / peak if peak else None,
        "warmup_s": compile_s, "timed_steps": steps, "peak_memory_gb": memory / 2**30 if memory else None,
        "kernels": kernels,
    }


# Kernel-name fragments -> where the time goes (first match wins).
KERNEL_KINDS = (("fused elementwise (compiled)", ("triton",)),
                ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
                ("matmul", ("gemm", "cutlass", "nvjet", "sm90", "matmul", "wgmma")),
                ("optimizer", ("adam", "foreach", "multi_tensor")),
                ("copy/cast", ("copy", "cast", "convert")))


def profile_kernels(step, dev: torch.device, steps: int = 5) -> dict:
    """Device time per kind of kernel over a few steps: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    accel.synchronize(dev)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        accel.synchronize(dev)
    totals: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if dev.type != "cuda" or us <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # kernels only: operators would count their kernels' time a second time
        name = e.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        totals[kind] = totals.get(kind, 0.0) + us / steps / 1e3
        top.append((us / steps / 1e3, e.key[:90]))
    top.sort(reverse=True)
    return {"ms_per_step_by_kind": totals, "top_ms_per_step": top[:15]}


def run(presets: list[str], batch_sizes: list[int], precision: str, compiles: list[str], steps: int,
        out: str | None, device: str = "auto", baseline: bool = True, precisions: list[str] | None = None,
        profile: bool = False, image_size: int = 32, channels: int = 4, num_classes: int = 1000,
        cuda_graphs: bool = False) -> list[dict]:
    """Each preset, batch size, precision and compile setting through the trainer's own step and, with
    `baseline`, the plain loop with the same compile setting, one right after the other.

    Under torchrun every rank runs it; rank 0 prints and writes. MFU counts all ranks' peak.
    """
    import tempfile

    from genfoundry.distributed import parallel

    dev = accel.get_device(device)
    parallel.init_process_group(dev, 600)
    impls = ("genfoundry", "baseline") if baseline else ("genfoundry",)
    runs = [(preset, batch, prec, comp, impl) for preset in presets for batch in batch_sizes
            for prec in precisions or [precision] for comp in compiles for impl in impls]
    results = []
    with bar(len(runs), "bench train", unit="run") as shown, tempfile.TemporaryDirectory() as root:
        say = shown.write if accel.rank() == 0 else (lambda *a, **k: None)  # printed above the bar
        ceilings = {}
        for prec in precisions or [precision]:
            ceilings[prec] = matmul_ceiling(dev, prec)
            say(f"matrix-product ceiling ({prec}, {accel.device_name(dev)}): {ceilings[prec] / 1e12:.1f} TFLOP/s; "
                f"{accel.world_size()} rank(s)")
        for preset, batch, prec, comp, impl in runs:
            ceiling = ceilings[prec]
            graphs = cuda_graphs and (comp == "loss" if impl == "genfoundry" else comp != "none")
            r = train_throughput(preset, image_size, channels, num_classes, batch, prec, comp, steps=steps,
                                 device=device, impl=impl, profile=profile, cuda_graphs=graphs, root=root)
            shown.update()
            r["matmul_ceiling_tflops"] = ceiling / 1e12
            r["mfu_measured_ceiling"] = r["achieved_tflops"] * 1e12 / (ceiling * accel.world_size())
            mfu = f"{r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else "n/a"
            mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] else "n/a"
            say(f"{preset} batch {batch} {prec} compile={comp}{' +graphs' if graphs else ''} {impl:>10} "
                f"x{r['world_size']}: {r['images_per_s']:.0f} images/s, {r['achieved_tflops']:.1f} TFLOP/s, "
                f"MFU {mfu} of datasheet peak, {r['mfu_measured_ceiling']:.1%} of measured ceiling, "
                f"peak memory {mem}")
            if r["kernels"]:
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["kernels"]["ms_per_step_by_kind"].items(),
                                                                   key=lambda kv: -kv[1]))
                say(f"  device ms per step by kernel kind: {kinds}")
            results.append(r)
            if dev.type == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            if impl == "baseline":
                ours, base = results[-2], results[-1]
                ours["baseline_images_per_s"] = base["images_per_s"]
                say(f"{preset} batch {batch} {prec} compile={comp}: trainer / plain loop = "
                    f"{ours['images_per_s'] / base['images_per_s']:.3f}")
    if out and accel.rank() == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), json.dumps({"format_version": 3, "benchmark": "train_throughput",
                                            "results": results}, indent=2).encode())
    parallel.destroy_process_group()
    return results
