"""The trainer's state and resume: what a checkpoint holds, saving it through the tiers, the
rank-0-chosen checkpoint every rank loads, rolling back, and the run directory's check. `Trainer`
takes these methods from `TrainerState`; they use the attributes `Trainer.__init__` sets (`parallel`,
`hook`, `checkpoints`, scaler, loader)."""

from __future__ import annotations

import torch

from genfoundry import accel, checkpoint
from genfoundry import config as config_lib
from genfoundry.checkpoint.manager import STATE, rank_file
from genfoundry.config import ConfigError
from genfoundry.distributed import parallel
from genfoundry.errors import GenfoundryError
from genfoundry.trainer.precision import DynamicLossScaler


class TrainerState:
    """Save, load and resume for `Trainer` (a split of one class along the state / loop seam)."""

    @property
    def dcp(self) -> bool:
        """True when full checkpoints hold FSDP2 shards through torch.distributed.checkpoint."""
        return self.parallel.sharded and self.cfg.checkpoint.sharded == "auto"

    def state_dict(self, weights: bool = True) -> dict:
        """The shared training state; with `weights`, the whole weights too (they resume on any number
        of ranks; under FSDP2 every rank must call it, as it gathers)."""
        state = {
            "step": self.step,
            "images_seen": self.images_seen,
            "train_time_s": self.train_time_s,
            "total_steps": self.total_steps,
            "planned_for_steps": self.cfg.train.steps,  # the train.steps that total_steps was planned under
            "precision": self.precision,
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "overflow_streak": self.overflow_streak,
            "data": self.loader.state_dict(),
            "rng": accel.rng_states(self.device),
            "config_hash": config_lib.config_hash(self.cfg),
            "sharded": not weights,
            # which per-rank files sit beside the state: the hook that wrote them, on how many ranks
            "rank_states": self.hook.written(),
        }
        return {**state, **self.parallel.full_state_dict()} if weights else state

    def load_state_dict(self, state: dict) -> None:
        if state["config_hash"] != config_lib.config_hash(self.cfg):
            raise ConfigError(f"the checkpoints in '{self.run_dir}' were written with another training config "
                              f"(another run, or an earlier genfoundry whose config had other keys); choose "
                              f"another --run.name to start a new run")
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.train_time_s = state.get("train_time_s", 0.0)
        # The budget's plan so far, unless train.steps changed (a run extended): then planned again at reports.
        if self.cfg.train.time_budget_s and state.get("planned_for_steps") == self.cfg.train.steps:
            self.total_steps = state["total_steps"]
        if not state["sharded"]:
            self.parallel.load_full_state_dict(state)
        self.precision = state["precision"]
        if self.precision != "fp16":
            self.scaler = None
        elif self.scaler is None:  # back to fp16 from after a fall-back to fp32 (a rollback)
            tc = self.cfg.train
            self.scaler = DynamicLossScaler(tc.loss_scale_init, tc.loss_scale_growth_interval)
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        self.overflow_streak = state["overflow_streak"]
        self.loader.load_state_dict(state["data"])
        accel.set_rng_states(self.device, state["rng"])

    def save_checkpoint(self, kind: str = "full") -> float:
        """Hands one checkpoint to the tiers; every rank calls it. Returns the seconds training paused."""
        if kind == "snapshot":
            ema = self.parallel.gather_ema().state_dict()
            meta = {k: v for k, v in self.model_meta().items() if k != "step"}  # the manager adds the step
            return self.checkpoints.save("snapshot", self.step, ema if self.rank == 0 else None, **meta)
        shared = self.state_dict(weights=not self.dcp)  # every rank: under FSDP2 full weights are gathered
        return self.checkpoints.save("full", self.step, shared if self.rank == 0 else None,
                                     self.hook.state_dict() if self.hook.per_rank else None,
                                     self.parallel.sharded_state_dict() if self.dcp else None,
                                     images_seen=self.images_seen, precision=self.precision)

    def load_agreed_checkpoint(self) -> bool:
        """Rank 0 picks the newest full checkpoint that verifies and every rank loads that one step,
        with its own per-rank file where the hook needs one; all ranks resume, or all stop with the
        reason. False when there is none.

        Ranks that chose for themselves could resume at different steps (a node-local run directory,
        a network filesystem that lags)."""
        directory = self.checkpoints.local.root
        newest = error = None
        if self.rank == 0:
            try:
                newest = self.checkpoints.newest()
            except OSError as e:
                error = checkpoint.CheckpointError(f"cannot list the checkpoints in '{directory}': {e.strerror or e}")
        step = accel.broadcast_int(-2 if error else newest if newest is not None else -1)
        if step == -2:
            parallel.raise_together(error, lambda n: checkpoint.CheckpointError(
                "rank 0 cannot list the checkpoints to resume from (its message says why)"))
        if step == -1:
            return False
        state = saved = None
        try:
            state = self.checkpoints.read(step)
            if state is None or state["step"] != step:
                raise checkpoint.CheckpointError(f"{self.checkpoints.path('full', step) / STATE} is missing or holds "
                                                 f"step {None if state is None else state['step']}, not {step}")
            written = state["rank_states"]
            owner = self.hook.owner(written, self.rank)
            if owner is not None:
                saved = self.checkpoints.read(step, rank_file(owner))
                if saved is None:
                    raise checkpoint.CheckpointError(
                        f"{self.checkpoints.path('full', step) / rank_file(owner)} is missing: step {step} was saved "
                        f"with per-rank {written['comm_hook']} state on {written['world_size']} ranks, and rank "
                        f"{self.rank} needs that file")
        except checkpoint.CheckpointError as e:
            error = checkpoint.CheckpointError(f"rank {self.rank} cannot resume from step {step}, which rank 0 "
                                               f"chose: {e}. Every rank must see the same run directory")
        parallel.raise_together(error, lambda n: checkpoint.CheckpointError(
            f"{n} rank(s) cannot resume from step {step}, which rank 0 chose (their messages say why)"))
        self.load_state_dict(state)
        if state["sharded"]:  # every rank, together: torch.distributed.checkpoint reshards to this world size
            shards = self.parallel.sharded_state_dict()
            self.checkpoints.load_sharded(step, shards)
            self.parallel.load_sharded_state_dict(shards)
        self.hook.load_state_dict(saved, state["rank_states"])
        low = accel.all_reduce(torch.tensor([self.step]), "min").item()
        high = accel.all_reduce(torch.tensor([self.step]), "max").item()
        if low != high:  # a programming error, not a user's: keep the traceback
            raise RuntimeError(f"ranks resumed at different steps ({low} .. {high})")
        return True

    def roll_back(self) -> bool:
        """Weights, optimizer, EMA and scaler back to the newest full checkpoint, keeping the step count,
        the data position and the random state, so the run goes on with the next data. False: none."""
        self.checkpoints.wait(uploads=False)  # the newest local one is whole; a slow remote is not waited for
        step, images, data, rng = self.step, self.images_seen, self.loader.state_dict(), accel.rng_states(self.device)
        clock = self.train_time_s, self.total_steps
        if not self.load_agreed_checkpoint():
            return False
        back = self.step
        self.step, self.images_seen = step, images
        self.train_time_s, self.total_steps = clock
        self.loader.load_state_dict(data)
        accel.set_rng_states(self.device, rng)
        return back

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
                self.checkpoints.clean()
            except OSError as e:
                error = ConfigError(f"cannot write the run directory '{self.run_dir}': {e.strerror or e}")
        parallel.raise_together(error, lambda n: ConfigError(
            f"rank 0 cannot write the run directory '{self.run_dir}' (its message says why)"))
        if self.load_agreed_checkpoint():
            self.print(f"resumed from step {self.step} ({self.images_seen} images seen)")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()
