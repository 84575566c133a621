"""The torchrun command line for N processes on this machine (imports no torch, so the CLI stays fast)."""

from __future__ import annotations

import sys


def torchrun_command(nproc: int, module: str, args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node=N -m MODULE ARGS...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]
