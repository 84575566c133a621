"""Runs a function on N real processes joined by a gloo (or NCCL) process group, with a hard time limit."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    """The environment torchrun would give rank `rank` of `world` on this machine, for a subprocess."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}


def _entry(rank, fn, world_size, port, backend, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    if backend == "nccl":  # as the trainer joins: one GPU per rank, the communicator made at once
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        import gc

        gc.collect()  # DDP's reducer must go before the group, or gloo may abort at exit
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo") -> None:
    """Calls fn(rank, world_size, *args) in world_size spawned processes joined by a `backend` process
    group; raises if any fails or the time runs out.

    fn must be a module-level function (it is pickled). Results travel through files the caller names in args.
    """
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, args), nprocs=world_size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s")


def worst_gradient_gap(plain, hooked, rank: int, steps: int) -> float:
    """Largest gradient difference between two DDP models of the same network over `steps` backward
    passes on this rank's random inputs of 8 features (a communication hook against DDP's own)."""
    import torch

    gen = torch.Generator().manual_seed(rank)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        for model in (plain, hooked):
            model.zero_grad()
            model(x).square().mean().backward()
        for a, b in zip(plain.parameters(), hooked.parameters()):
            worst = max(worst, (a.grad - b.grad).abs().max().item())
    return worst
