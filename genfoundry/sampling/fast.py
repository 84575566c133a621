"""The network as a sampler calls it: weights cast once to the sampling precision, and on accelerators
compiled and replayed as CUDA graphs, one per batch shape.

Autocast re-casts every weight at every call and leaves each small kernel to be launched from Python;
sampling calls the same network with the same shapes thousands of times, so both costs are paid once
here instead. The ODE state stays in float32; only the network runs in the chosen precision.

`fp8` runs the matrix products of the transformer blocks in float8 (e4m3): each weight row is scaled
into float8 once, each activation row at each call (its absolute maximum to the format's largest
value), and the product accumulates in higher precision with both scales applied to its output
(`torch._scaled_mm`, row-wise scales). The embeddings, the final layer and everything outside matrix
products stay bf16. It changes the images more than bf16 does; its FID is measured beside bf16's.
"""

from __future__ import annotations

import copy

import torch

from genfoundry import accel
from genfoundry.config import SAMPLE_PRECISIONS as PRECISIONS
from genfoundry.errors import ConfigError
from genfoundry.config import SAMPLE_COMPILE as COMPILE_MODES
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    """float32 [rows, 1]: each row's absolute maximum over E4M3_MAX (rows of zeros get a tiny scale)."""
    return (x.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)


class Float8Linear(torch.nn.Module):
    """An nn.Linear whose product runs in float8 e4m3 with one scale per weight row and per input row."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = _row_scale(w)
        self.register_buffer("weight", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = _row_scale(rows)
        q = (rows.float() / scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], y.shape[-1])


def to_float8(net: torch.nn.Module) -> int:
    """Replaces, in place, every nn.Linear inside net.blocks whose sizes float8 kernels take (multiples of
    16) by a Float8Linear; returns how many it replaced."""
    count = 0
    for block in net.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0:
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                setattr(parent, name.rsplit(".", 1)[-1], Float8Linear(module))
                count += 1
    return count


def float8_supported(device: torch.device) -> bool:
    """Float8 matrix products: CUDA GPUs of compute capability 8.9 and later (Ada, Hopper, Blackwell), and
    the CPU kernels of recent torch builds (slow: for tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and hasattr(torch, "float8_e4m3fn")


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
        self.folded_guidance = getattr(model, "folded_guidance", None)
        self.precision = accel.resolve_precision(precision, self.device)
        self.dtype = _DTYPES[self.precision]
        self.mode = resolve_compile(compile, self.device)
        if self.precision == "fp8" and not float8_supported(self.device):
            raise ConfigError(f"sample.precision fp8 needs float8 matrix products (a CUDA GPU of compute capability "
                              f"8.9 or later); {accel.device_name(self.device)} has none: use bf16")
        first = next(model.parameters())
        unchanged = first.dtype == self.dtype and first.device == self.device and self.precision != "fp8"
        if unchanged and self.mode == "none":
            net = model  # nothing to change: use it as it is, without a copy
        else:
            net = copy.deepcopy(model).to(self.device, self.dtype)
            if self.precision == "fp8":
                to_float8(net)
        self.net = net.eval().requires_grad_(False)
        # A compiled network keeps one graph per input shape, so callers pad to a fixed batch size.
        self.fixed_shapes = self.mode != "none"
        self.rows = 0  # images times passes evaluated so far: what a solver and its guidance cost
        if self.mode == "none":
            self.forward = self.net
        else:
            self.forward = torch.compile(self.net, dynamic=False,
                                         mode="reduce-overhead" if self.mode == "graphs" else None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        with torch.no_grad():
            if self.mode == "graphs":
                torch.compiler.cudagraph_mark_step_begin()
            out = self.forward(x.to(self.dtype), t, y)
            # a CUDA graph's output is overwritten by its next replay: the caller gets its own copy
            return out.to(torch.float32, copy=self.mode == "graphs")
