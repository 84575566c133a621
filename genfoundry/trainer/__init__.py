"""The training loop (loop.py), the state it saves and resumes from (state.py), precision handling."""

from genfoundry.trainer.loop import Trainer, run_dir_of

__all__ = ["Trainer", "run_dir_of"]
