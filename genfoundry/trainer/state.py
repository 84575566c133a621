"""The trainer's state and resume: the whole state as one bundle, the rank-0-chosen checkpoint every rank
loads, and the run directory's check. `Trainer` takes these methods from `TrainerState`; they use the
attributes `Trainer.__init__` sets (model, optimizer, EMA, scaler, loader, communication-hook state)."""

from __future__ import annotations

import torch

from genfoundry import accel, checkpoint
from genfoundry import config as config_lib
from genfoundry.config import ConfigError
from genfoundry.distributed import parallel
from genfoundry.errors import GenfoundryError


class TrainerState:
    """Save, load and resume for `Trainer` (a split of one class along the state / loop seam)."""

    def model_state(self) -> dict:
        """Full (unsharded) model weights; under FSDP2 every rank must call it (it gathers)."""
        if not self.sharded:
            return self.net.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self) -> dict:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict(self) -> dict:
        """The whole training state, with full weights: it resumes on any number of ranks."""
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "model": self.model_state(),
            "ema": self.ema_state(),
            "optimizer": self.optimizer_state(),
            "precision": self.precision,
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "overflow_streak": self.overflow_streak,
            "data": self.loader.state_dict(),
            "rng": accel.rng_states(self.device),
            "config_hash": config_lib.config_hash(self.cfg),
            # which per-rank files sit beside the bundle: the hook that wrote them, on how many ranks
            "rank_states": {"comm_hook": self.cfg.parallel.comm_hook, "world_size": self.world}
            if hasattr(self.comm_state, "state_dict") else {},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config_hash"] != config_lib.config_hash(self.cfg):
            raise ConfigError(f"the checkpoints in '{self.run_dir}' were written with another training config "
                              f"(another run, or an earlier genfoundry whose config had other keys); choose "
                              f"another --run.name to start a new run")
        self.step, self.images_seen = state["step"], state["images_seen"]
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
            self.ema.load_state_dict(state["ema"])
            for shard, full in zip(self.ema_shards, self.ema.parameters()):
                shard.to_local().copy_(parallel.shard_of(shard, full))
        else:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.ema.load_state_dict(state["ema"])
        self.precision = state["precision"]
        self.scaler = None if self.precision != "fp16" else self.scaler
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        self.overflow_streak = state["overflow_streak"]
        self.loader.load_state_dict(state["data"])
        accel.set_rng_states(self.device, state["rng"])

    def load_comm_state(self, saved: dict | None, written: dict | None) -> None:
        """This rank's communication-hook state of the resumed step. On another number of ranks the
        per-rank part has no owner: only what survives that carries over (`resume_schedule`)."""
        if not hasattr(self.comm_state, "load_state_dict"):
            return
        if saved is None:
            before = (f"it was written with comm_hook={written.get('comm_hook', 'none')}" if written is not None
                      else "an older checkpoint records no hook state")
            self.print(f"the checkpoint holds no state of parallel.comm_hook={self.cfg.parallel.comm_hook} "
                       f"({before}); the hook starts afresh")
            return
        written = written or {}
        if written["world_size"] != self.world:
            note = self.comm_state.resume_schedule(saved)
            self.print(f"the checkpoint was written on {written['world_size']} ranks, this run has {self.world}: {note}")
        else:
            self.comm_state.load_state_dict({k: v for k, v in saved.items() if k != "format_version"})
        self._comm_bytes = self.comm_state.bytes_sent
        self._dense_bytes = getattr(self.comm_state, "dense_bytes", 0)

    def load_agreed_checkpoint(self) -> tuple[dict, dict | None] | None:
        """Rank 0 picks the newest checkpoint that loads and every rank loads that one step, with its
        own per-rank file where the hook needs one; all ranks resume, or all stop with the reason.

        Ranks that chose for themselves could resume at different steps (a node-local run directory,
        a network filesystem that lags)."""
        directory = self.run_dir / "checkpoints"
        newest = error = None
        if self.rank == 0:
            try:
                newest = checkpoint.load_latest(directory)
            except OSError as e:
                error = checkpoint.CheckpointError(f"cannot list the checkpoints in '{directory}': {e.strerror or e}")
        step = accel.broadcast_int(-2 if error else newest["step"] if newest is not None else -1)
        if step == -2:
            parallel.raise_together(error, lambda n: checkpoint.CheckpointError(
                "rank 0 cannot list the checkpoints to resume from (its message says why)"))
        if step == -1:
            return None
        state = saved = None
        try:
            state = newest if self.rank == 0 else checkpoint.load(checkpoint.checkpoint_path(directory, step))
            if state["step"] != step:
                raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_path(directory, step)} holds step "
                                                 f"{state['step']}, not {step}")
            written = state.get("rank_states") or {}
            if hasattr(self.comm_state, "load_state_dict") and written.get("comm_hook") == self.cfg.parallel.comm_hook:
                owner = self.rank if written["world_size"] == self.world else 0
                saved = checkpoint.load_rank_state(directory, step, owner)
                if saved is None:
                    raise checkpoint.CheckpointError(
                        f"{checkpoint.rank_state_path(directory, step, owner)} is missing: step {step} was saved "
                        f"with per-rank {written['comm_hook']} state on {written['world_size']} ranks, and rank "
                        f"{self.rank} needs that file")
        except checkpoint.CheckpointError as e:
            error = checkpoint.CheckpointError(f"rank {self.rank} cannot resume from step {step}, which rank 0 "
                                               f"chose: {e}. Every rank must see the same run directory")
        parallel.raise_together(error, lambda n: checkpoint.CheckpointError(
            f"{n} rank(s) cannot resume from step {step}, which rank 0 chose (their messages say why)"))
        return state, saved

    def prepare_run_dir(self) -> None:
        """Creates the run directory, or checks that it belongs to this config and resumes from it.
        Each check runs on every rank and all ranks stop together, so none waits for one that stopped."""
        saved = self.run_dir / "config.toml"
        error = None
        if saved.exists():  # every rank checks the run directory it sees
            try:
                before = config_lib.load(str(saved))
                changed = config_lib.identity_diff(before, self.cfg)
                if changed:
                    values = [f"--{key}={config_lib.value_of(before, key)}" for key in changed]
                    raise ConfigError(f"run directory '{self.run_dir}' holds a run with different "
                                      f"{', '.join(changed)}; to continue it pass {' '.join(values)}, or choose "
                                      f"another --run.name to start a new run")
            except GenfoundryError as e:
                error = e
        # Also the barrier before rank 0 rewrites config.toml, which the others may still be reading.
        parallel.raise_together(error, lambda n: ConfigError(
            f"{n} rank(s) found another run in '{self.run_dir}' (their messages say what differs)"))
        if self.rank == 0:
            try:
                (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
                checkpoint.write_atomic(saved, config_lib.dumps(self.cfg).encode())
            except OSError as e:
                error = ConfigError(f"cannot write the run directory '{self.run_dir}': {e.strerror or e}")
        parallel.raise_together(error, lambda n: ConfigError(
            f"rank 0 cannot write the run directory '{self.run_dir}' (its message says why)"))
        agreed = self.load_agreed_checkpoint()
        if agreed is not None:
            state, saved = agreed
            self.load_state_dict(state)
            self.load_comm_state(saved, state.get("rank_states"))
            self.print(f"resumed from step {self.step} ({self.images_seen} images seen)")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()
