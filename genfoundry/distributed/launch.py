"""The torchrun command line for N processes on this machine (imports no torch, so the CLI stays fast)."""

from __future__ import annotations

import sys

# For runs that torchrun restarts: since torch 2.5 torchrun lends its rendezvous store to the workers and
# keeps it across restarts, so the restarted workers can find the dead ones' addresses in it (gloo on
# torch 2.13: the new process group hangs or is refused). With this the workers make a store of their
# own at each start.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_command(nproc: int, module: str, args: list[str] | tuple[str, ...] = (),
                     max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node=N [--max-restarts=K] -m MODULE ARGS...`.

    With `max_restarts` K > 0 torchrun restarts all N processes when one fails, up to K times; run it
    with RESTART_ENV in its environment."""
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts > 0 else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *restarts,
            "-m", module, *args]
