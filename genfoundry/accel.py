"""Which accelerator and communication backend to use, from what torch reports; rank/world helpers.

This is the one place that names device types. A new backend is one line in BACKENDS.
"""

from __future__ import annotations

import os

import torch

from genfoundry.errors import ConfigError

# device type -> torch.distributed backend
BACKENDS = {
    "cuda": "nccl",
    "npu": "hccl",
    "xpu": "xccl",
    "hpu": "hccl",
    "mps": "gloo",
    "cpu": "gloo",
}

# Dense bf16/fp16 matrix peak in FLOP/s by device name, from vendor datasheets (no sparsity).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def accelerator_type() -> str:
    """'cuda', 'npu', 'xpu', 'mps', ... as torch reports it, or 'cpu' when none is present."""
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator().type
    return "cpu"


def get_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        kind = accelerator_type()
        if kind == "cpu":
            return torch.device("cpu")
        return torch.device(kind, local_rank() % max(1, torch.accelerator.device_count()))
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ConfigError(f"run.device '{requested}' is not a device torch knows: {e}") from None
    if device.type != "cpu" and device.type != accelerator_type():
        raise ConfigError(f"run.device '{requested}' is not available here; this machine has '{accelerator_type()}'")
    return device


def comm_backend(device: torch.device) -> str:
    return BACKENDS.get(device.type, "gloo")


def device_module(device: torch.device):
    """torch.cuda, torch.xpu, ... for accelerator-specific calls, or None on CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def synchronize(device: torch.device) -> None:
    mod = device_module(device)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize(device)


def max_memory_allocated(device: torch.device) -> int | None:
    """Peak bytes allocated on the accelerator since the last reset, or None where unknown (CPU)."""
    mod = device_module(device)
    if mod is not None and hasattr(mod, "max_memory_allocated"):
        return mod.max_memory_allocated(device)
    return None


def memory_gb(device: torch.device) -> tuple[float, float]:
    """(allocated now, peak allocated) in GiB: the accelerator's allocator where it has one, else this
    process's resident memory (now from /proc where Linux has it, peak from getrusage)."""
    mod, peak = device_module(device), max_memory_allocated(device)
    if peak is not None and hasattr(mod, "memory_allocated"):
        return mod.memory_allocated(device) / 2**30, peak / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        now = peak
    return now, peak


def reset_peak_memory(device: torch.device) -> None:
    mod = device_module(device)
    if mod is not None and hasattr(mod, "reset_peak_memory_stats"):
        mod.reset_peak_memory_stats(device)


def device_name(device: torch.device) -> str:
    mod = device_module(device)
    if mod is not None and hasattr(mod, "get_device_name"):
        return mod.get_device_name(device)
    return device.type


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Datasheet dense matrix peak for bf16/fp16 on a known accelerator; None where we do not know it."""
    if precision not in ("bf16", "fp16"):
        return None
    return PEAK_FLOPS.get(device_name(device))


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' as bf16 on a CUDA GPU with native bf16, else fp32: on a CPU without AVX-512 BF16, bf16
    autocast is slower than fp32. Other values stand as they are."""
    if precision != "auto":
        return precision
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str):
    """A context that runs matrix work in the chosen precision (a no-op for fp32)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def rng_states(device: torch.device) -> dict:
    """Global RNG states of the host and, where present, the accelerator."""
    states = {"cpu": torch.get_rng_state()}
    mod = device_module(device)
    if mod is not None and hasattr(mod, "get_rng_state"):
        states[device.type] = mod.get_rng_state(device)
    return states


def set_rng_states(device: torch.device, states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    mod = device_module(device)
    if mod is not None and device.type in states:
        mod.set_rng_state(states[device.type], device)


def distributed() -> bool:
    """True once this process has joined a torch.distributed process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank: the process group's once joined, torchrun's RANK before, else 0."""
    return torch.distributed.get_rank() if distributed() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Ranks in the process group once joined, torchrun's WORLD_SIZE before, else 1."""
    return torch.distributed.get_world_size() if distributed() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


# ---- collectives on host-side values ---------------------------------------------------------------
# Every collective genfoundry issues itself (metrics, overflow flags, agreed sizes and steps) goes
# through these, so each tensor is on a device its backend takes: NCCL, HCCL and XCCL refuse CPU
# tensors, where gloo takes them. Gradient hooks work on DDP's buckets, which are already there.


def backend_devices(config: str) -> list[str]:
    """Device types a process group's backend config takes tensors of, e.g. 'cpu:gloo,cuda:gloo' ->
    ['cpu', 'cuda'] and 'cuda:nccl' -> ['cuda'] (the format of torch.distributed.get_backend_config)."""
    return [part.split(":")[0].strip() for part in config.split(",") if ":" in part]


def comm_device(group=None) -> torch.device:
    """The device on which the process group's backend takes tensors: the CPU where it can (gloo),
    else this process's accelerator (NCCL and its kin)."""
    kinds = backend_devices(torch.distributed.get_backend_config(group))
    if "cpu" in kinds:
        return torch.device("cpu")
    kind = accelerator_type()
    if kind not in kinds:
        raise RuntimeError(f"the process group's backend takes tensors on {kinds}, and this process has "
                           f"no such device (it has '{kind}')")
    return torch.device(kind, torch.accelerator.current_device_index())


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """`tensor` reduced over the ranks ('sum', 'min' or 'max'), on the communication device. Without a
    process group it is the tensor itself."""
    if not distributed():
        return tensor
    work = tensor.to(comm_device(group))
    if work is tensor:
        work = tensor.clone()
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(work, ops[op], group=group)
    return work


def gather(tensor: torch.Tensor, dst: int = 0, group=None) -> list[torch.Tensor] | None:
    """On rank `dst`, every rank's `tensor` (the same shape on all) in rank order, on the communication
    device; None on the other ranks. A rank alone gets its own."""
    if not distributed():
        return [tensor]
    work = tensor.to(comm_device(group))
    parts = [torch.empty_like(work) for _ in range(torch.distributed.get_world_size(group))] \
        if torch.distributed.get_rank(group) == dst else None
    torch.distributed.gather(work, parts, dst=dst, group=group)
    return parts


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank `src`'s value on every rank (a value alone when running alone)."""
    if not distributed():
        return value
    work = torch.tensor([value], dtype=torch.int64, device=comm_device())
    torch.distributed.broadcast(work, src)
    return int(work.item())
