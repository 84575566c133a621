"""The network as a sampler calls it: weights cast once to the sampling precision, and on accelerators
compiled and replayed as CUDA graphs, one per batch shape.

Autocast re-casts every weight at every call and leaves each small kernel to be launched from Python;
sampling calls the same network with the same shapes thousands of times, so both costs are paid once
here instead. The ODE state stays in float32; only the network runs in the chosen precision.
"""

from __future__ import annotations

import copy

import torch

from genfoundry import accel
from genfoundry.config import PRECISIONS
from genfoundry.config import SAMPLE_COMPILE as COMPILE_MODES
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_compile(mode: str, device: torch.device) -> str:
    """'auto': compiled with CUDA graphs on a CUDA GPU, compiled on other accelerators, eager on a CPU
    (where compiling costs more than the few images a CPU makes would win back)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown sampling compile mode '{mode}'; choose from {', '.join(COMPILE_MODES)}")
    if mode == "graphs" and device.type != "cuda":
        return "compile"
    if mode != "auto":
        return mode
    return "graphs" if device.type == "cuda" else "none" if device.type == "cpu" else "compile"


class SamplingNetwork:
    """Callable (x, t, y) -> float32 velocity, with the model's `arch`."""

    def __init__(self, model: torch.nn.Module, device, precision: str = "auto", compile: str = "none"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown sampling precision '{precision}'; choose from {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.arch = model.arch
        self.precision = accel.resolve_precision(precision, self.device)
        self.dtype = _DTYPES[self.precision]
        self.mode = resolve_compile(compile, self.device)
        first = next(model.parameters())
        if first.dtype == self.dtype and first.device == self.device and self.mode == "none":
            net = model  # nothing to change: use it as it is, without a copy
        else:
            net = copy.deepcopy(model).to(self.device, self.dtype)
        self.net = net.eval().requires_grad_(False)
        # A compiled network keeps one graph per input shape, so callers pad to a fixed batch size.
        self.fixed_shapes = self.mode != "none"
        if self.mode == "none":
            self.forward = self.net
        else:
            self.forward = torch.compile(self.net, dynamic=False,
                                         mode="reduce-overhead" if self.mode == "graphs" else None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.mode == "graphs":
                torch.compiler.cudagraph_mark_step_begin()
            out = self.forward(x.to(self.dtype), t, y)
            # a CUDA graph's output is overwritten by its next replay: the caller gets its own copy
            return out.to(torch.float32, copy=self.mode == "graphs")
