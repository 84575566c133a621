"""The training loop, precision handling and the state it saves."""

from genfoundry.trainer.loop import Trainer, run_dir_of

__all__ = ["Trainer", "run_dir_of"]
