"""Training throughput and MFU of a DiT preset on random inputs, against a measured matmul ceiling.

FLOPs are 2 x multiply-adds, a training step is 3 x the forward pass (DiT.flops_per_forward).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from genfoundry import accel
from genfoundry.diffusion import FlowMatching
from genfoundry.models import build_model


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


def train_throughput(preset: str = "DiT-B/2", image_size: int = 32, channels: int = 4, num_classes: int = 1000,
                     batch_size: int = 256, precision: str = "bf16", compile: bool = True, warmup: int = 10,
                     steps: int = 30, device: str = "auto") -> dict:
    """Images/s of full training steps (forward, backward, AdamW) on random data."""
    dev = accel.get_device(device)
    torch.manual_seed(0)
    model = build_model(preset, image_size, channels, num_classes).to(dev)
    flops_fwd = model.flops_per_forward()
    net = torch.compile(model) if compile else model
    fused = dev.type != "cpu"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    objective = FlowMatching()
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randn(batch_size, channels, image_size, image_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)

    def step():
        t, eps, drop = objective.draw(x, gen)
        with accel.autocast(dev, precision):
            loss = objective.loss(net, x, y, t, eps, drop)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    time_it = _timer(dev)
    compile_s = sum(time_it(step) for _ in range(warmup))
    accel.reset_peak_memory(dev)
    elapsed = time_it(lambda: [step() for _ in range(steps)])
    ips = steps * batch_size / elapsed
    achieved = ips * 3 * flops_fwd
    peak = accel.peak_flops(dev, precision)
    memory = accel.max_memory_allocated(dev)
    return {
        "preset": preset, "input": [channels, image_size, image_size], "tokens": model.arch.num_tokens,
        "batch_size": batch_size, "precision": precision, "compile": compile, "device": accel.device_name(dev),
        "torch": torch.__version__, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_per_forward": flops_fwd / 1e9, "images_per_s": ips, "achieved_tflops": achieved / 1e12,
        "datasheet_peak_tflops": peak / 1e12 if peak else None,
        "mfu_datasheet": achieved / peak if peak else None,
        "warmup_s": compile_s, "timed_steps": steps, "peak_memory_gb": memory / 2**30 if memory else None,
    }


def run(presets: list[str], batch_size: int, precision: str, compile: bool, steps: int, out: str | None,
        device: str = "auto") -> list[dict]:
    dev = accel.get_device(device)
    ceiling = matmul_ceiling(dev, precision)
    print(f"matrix-product ceiling ({precision}, {accel.device_name(dev)}): {ceiling / 1e12:.1f} TFLOP/s")
    results = []
    for preset in presets:
        r = train_throughput(preset, batch_size=batch_size, precision=precision, compile=compile, steps=steps,
                             device=device)
        r["matmul_ceiling_tflops"] = ceiling / 1e12
        r["mfu_measured_ceiling"] = r["achieved_tflops"] * 1e12 / ceiling
        mfu = f"{r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else "n/a"
        print(f"{preset}: {r['images_per_s']:.0f} images/s, {r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu} of "
              f"datasheet peak, {r['mfu_measured_ceiling']:.1%} of measured matmul ceiling")
        results.append(r)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"format_version": 1, "benchmark": "train_throughput", "results": results}, indent=2))
    return results
