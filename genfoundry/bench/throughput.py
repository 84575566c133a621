"""Training throughput and MFU of a DiT preset on random inputs, against a measured matmul ceiling.

FLOPs are 2 x multiply-adds, a training step is 3 x the forward pass (DiT.flops_per_forward).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from genfoundry import accel, seeding
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


def build_step(impl: str, preset: str, image_size: int, channels: int, num_classes: int, batch_size: int,
               precision: str, compile: str, dev: torch.device):
    """A function running one training step of `batch_size` images per rank, and the model.

    impl "genfoundry": the trainer's path: `parallelize` (DDP on several ranks), per-sample keyed noise,
    fused AdamW, the fp16 loss scaler. impl "baseline": a plain PyTorch loop, DDP on several ranks,
    eager (no compile), batched noise, AdamW as torch defaults it.
    """
    from genfoundry.config import ParallelConfig
    from genfoundry.distributed import parallel
    from genfoundry.trainer.precision import DynamicLossScaler

    torch.manual_seed(0)
    model = build_model(preset, image_size, channels, num_classes).to(dev)
    objective = FlowMatching()
    gen = torch.Generator(dev).manual_seed(accel.rank())
    x = torch.randn(batch_size, channels, image_size, image_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    scaler = DynamicLossScaler() if precision == "fp16" else None
    if impl == "baseline":
        net = model
        if accel.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        draw = lambda: objective.draw(x, gen)  # noqa: E731
    else:
        net = parallel.parallelize(model, ParallelConfig(compile=compile == "blocks"), dev)
        if compile == "model":
            net = torch.compile(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type != "cpu")
        step_no = [0]

        def draw():
            step_no[0] += 1
            base = seeding.mix(step_no[0]) % 2**62 + accel.rank() * batch_size
            return objective.draw_keyed(x, range(base, base + batch_size))

    def step():
        t, eps, drop = draw()
        with accel.autocast(dev, precision):
            loss = objective.loss(net, x, y, t, eps, drop)
        (loss * scaler.scale if scaler else loss).backward()
        if scaler is None or scaler.unscale_and_check([p.grad for p in model.parameters() if p.grad is not None]):
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def train_throughput(preset: str = "DiT-B/2", image_size: int = 32, channels: int = 4, num_classes: int = 1000,
                     batch_size: int = 256, precision: str = "bf16", compile: str = "blocks", warmup: int = 10,
                     steps: int = 30, device: str = "auto", impl: str = "genfoundry", profile: bool = False) -> dict:
    """Images/s of full training steps (forward, backward, AdamW) on random data, over all ranks."""
    dev = accel.get_device(device)
    step, model = build_step(impl, preset, image_size, channels, num_classes, batch_size, precision,
                             compile if impl == "genfoundry" else "none", dev)
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
        "preset": preset, "impl": impl, "input": [channels, image_size, image_size], "tokens": model.arch.num_tokens,
        "world_size": world, "batch_size_per_rank": batch_size, "precision": precision,
        "compile": compile if impl == "genfoundry" else "none", "device": accel.device_name(dev),
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


def run(presets: list[str], batch_size: int, precision: str, compile: str, steps: int, out: str | None,
        device: str = "auto", baseline: bool = True, precisions: list[str] | None = None,
        profile: bool = False) -> list[dict]:
    """Each preset (and precision) through genfoundry's path and, with `baseline`, a plain eager loop.

    Under torchrun every rank runs it; rank 0 prints and writes. MFU counts all ranks' peak.
    """
    from genfoundry.distributed import parallel

    dev = accel.get_device(device)
    parallel.init_process_group(dev, 600)
    impls = ("genfoundry", "baseline") if baseline else ("genfoundry",)
    runs = [(preset, prec, impl) for preset in presets for prec in precisions or [precision] for impl in impls]
    results = []
    with bar(len(runs), "bench train", unit="run") as shown:
        say = shown.write if accel.rank() == 0 else (lambda *a, **k: None)  # printed above the bar
        ceilings = {}
        for prec in precisions or [precision]:
            ceilings[prec] = matmul_ceiling(dev, prec)
            say(f"matrix-product ceiling ({prec}, {accel.device_name(dev)}): {ceilings[prec] / 1e12:.1f} TFLOP/s; "
                f"{accel.world_size()} rank(s)")
        for preset, prec, impl in runs:
            ceiling = ceilings[prec]
            r = train_throughput(preset, batch_size=batch_size, precision=prec, compile=compile, steps=steps,
                                 device=device, impl=impl, profile=profile and impl == "genfoundry")
            shown.update()
            r["matmul_ceiling_tflops"] = ceiling / 1e12
            r["mfu_measured_ceiling"] = r["achieved_tflops"] * 1e12 / (ceiling * accel.world_size())
            mfu = f"{r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else "n/a"
            mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] else "n/a"
            say(f"{preset} {prec} {impl:>10} x{r['world_size']}: {r['images_per_s']:.0f} images/s, "
                f"{r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu} of datasheet peak, "
                f"{r['mfu_measured_ceiling']:.1%} of measured ceiling, peak memory {mem}")
            if r["kernels"]:
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["kernels"]["ms_per_step_by_kind"].items(),
                                                                   key=lambda kv: -kv[1]))
                say(f"  device ms per step by kernel kind: {kinds}")
            results.append(r)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if impl == "baseline":
                ours, base = results[-2], results[-1]
                say(f"{preset} {prec}: genfoundry / baseline = {ours['images_per_s'] / base['images_per_s']:.2f}x")
    if out and accel.rank() == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), json.dumps({"format_version": 2, "benchmark": "train_throughput",
                                            "results": results}, indent=2).encode())
    parallel.destroy_process_group()
    return results
