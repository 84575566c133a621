"""The state of what `parallelize()` trains, behind `state_dict()` / `load_state_dict()`, so the trainer
only asks to save, load and step.

- `ParallelState`: the model under its wrapper, its optimizer and its EMA. Under FSDP2 the EMA is kept
  as shards beside the parameters. `full_state_dict()` gathers whole tensors, which resume on any number
  of ranks; `sharded_state_dict()` gives DTensors for `torch.distributed.checkpoint`, which reshards on
  load when the world size changed.
- `HookState`: a communication hook's per-rank state (residuals, low-rank factors) and its byte
  counters. Per-rank state has no owner on another number of ranks: it says so in one line and keeps
  what carries over.
"""

from __future__ import annotations

import torch
from torch import nn

from genfoundry import metrics
from genfoundry.distributed import parallel


class ParallelState:
    """Model, optimizer and EMA of one run, as `parallelize()` laid them out."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module):
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.sharded = parallel.is_sharded(model)
        # Under FSDP2 the EMA lives as shards laid out like the parameters, gathered into `ema` on use.
        self.ema_shards = [p.detach().clone() for p in model.parameters()] if self.sharded else None

    @property
    def net(self) -> nn.Module:
        return parallel.unwrap(self.model)

    @torch.no_grad()
    def update_ema(self, beta: float) -> None:
        if self.sharded:
            torch._foreach_lerp_([s.to_local() for s in self.ema_shards],
                                 [p.detach().to_local() for p in self.model.parameters()], 1.0 - beta)
        else:
            torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.net.parameters()], 1.0 - beta)

    @torch.no_grad()
    def gather_ema(self) -> nn.Module:
        """The whole EMA network; under FSDP2 every rank must call it (it gathers the shards)."""
        if self.sharded:
            for full, shard in zip(self.ema.parameters(), self.ema_shards):
                full.copy_(shard.full_tensor())
        return self.ema

    def model_state(self) -> dict:
        """Full model weights; under FSDP2 every rank must call it (it gathers)."""
        if not self.sharded:
            return self.net.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_state_dict(self) -> dict:
        """Whole weights, optimizer state and EMA: they resume on any number of ranks. Unsharded, the
        tensors are the live ones (a caller that keeps them copies them)."""
        if not self.sharded:
            return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "ema": self.ema.state_dict()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": self.model_state(), "optimizer": get_optimizer_state_dict(self.model, self.optimizer,
                                                                                  options=options),
                "ema": self.gather_ema().state_dict()}

    def load_full_state_dict(self, state: dict) -> None:
        if not self.sharded:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.ema.load_state_dict(state["ema"])
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.ema.load_state_dict(state["ema"])
        for shard, full in zip(self.ema_shards, self.ema.parameters()):
            shard.to_local().copy_(parallel.shard_of(shard, full))

    def sharded_state_dict(self) -> dict:
        """The state as `torch.distributed.checkpoint` saves and loads it: this rank's shards as DTensors
        under FSDP2, whole tensors otherwise. Loading into it reshards to this layout, whatever wrote it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        module = self.model if self.sharded else self.net
        ema = (dict(zip([name for name, _ in self.model.named_parameters()], self.ema_shards)) if self.sharded
               else dict(self.ema.named_parameters()))
        return {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, self.optimizer),
                "ema": ema}

    def load_sharded_state_dict(self, state: dict) -> None:
        """After `torch.distributed.checkpoint.load` filled `state` (from `sharded_state_dict()`) in place;
        the EMA was loaded in place (under FSDP2 its gathered copy follows on the next use)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        module = self.model if self.sharded else self.net
        set_model_state_dict(module, state["model"])
        set_optimizer_state_dict(module, self.optimizer, state["optimizer"])


class HookState:
    """A communication hook's state as the trainer sees it: per-step calls, byte counts, save, load."""

    def __init__(self, comm_state, hook: str, world: int, print_fn=print, plain_bytes: int | None = None):
        self.comm, self.hook, self.world, self.print = comm_state, hook, world, print_fn
        self._sent = self._dense = 0
        self.plain_bytes = plain_bytes  # without a hook: what the strategy's collectives send per step

    @property
    def per_rank(self) -> bool:
        """True when each rank holds state of its own that a checkpoint must keep (one file per rank)."""
        return hasattr(self.comm, "state_dict")

    def begin_step(self, scale: float, may_skip: bool) -> None:
        if self.comm is not None:  # the hook sees gradients times `scale`; a skipped step is undone
            self.comm.begin_step(scale, may_skip=may_skip)

    def finish_step(self, applied: bool) -> None:
        if self.comm is None:
            if self.plain_bytes:
                metrics.report("comm/bytes_per_step", self.plain_bytes)
            return
        self.comm.finish_step(applied=applied)
        metrics.report("comm/bytes_per_step", self.comm.bytes_sent - self._sent)
        self._sent = self.comm.bytes_sent
        dense = getattr(self.comm, "dense_bytes", None)
        if dense is not None:  # what a plain all-reduce would have sent this step
            metrics.report("comm/dense_bytes_per_step", dense - self._dense)
            self._dense = dense

    def written(self) -> dict:
        """What a checkpoint records about the per-rank files beside it."""
        return {"comm_hook": self.hook, "world_size": self.world} if self.per_rank else {}

    def state_dict(self) -> dict:
        return {"world_size": self.world, **self.comm.state_dict()}

    def owner(self, written: dict, rank: int) -> int | None:
        """Whose per-rank file this rank loads from a checkpoint that recorded `written`; None: none."""
        if not self.per_rank or written.get("comm_hook") != self.hook:
            return None
        return rank if written["world_size"] == self.world else 0

    def load_state_dict(self, saved: dict | None, written: dict | None) -> None:
        """This rank's hook state of the resumed step. On another number of ranks only what survives
        that carries over (`resume_schedule`), and it says so."""
        if not self.per_rank:
            return
        if saved is None:
            before = (f"it was written with comm_hook={written.get('comm_hook', 'none')}" if written is not None
                      else "an older checkpoint records no hook state")
            self.print(f"the checkpoint holds no state of parallel.comm_hook={self.hook} ({before}); "
                       f"the hook starts afresh")
            return
        if written["world_size"] != self.world:
            note = self.comm.resume_schedule(saved)
            self.print(f"the checkpoint was written on {written['world_size']} ranks, this run has {self.world}: {note}")
        else:
            self.comm.load_state_dict({k: v for k, v in saved.items() if k not in ("format_version", "world_size")})
        self._sent = self.comm.bytes_sent
        self._dense = getattr(self.comm, "dense_bytes", 0)
