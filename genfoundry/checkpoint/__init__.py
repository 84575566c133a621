"""Checkpoints and durable files: `storage` (the one atomic-write helper, plain Python) and `bundle`
(the training state: atomic save, newest-valid load with weights_only=True, per-rank files, pruning).

`from genfoundry import checkpoint; checkpoint.save(...)` reaches the bundle functions; they import
torch on first use, so `checkpoint.storage` stays light for processes that do not need torch.
"""

from genfoundry.checkpoint.storage import atomic_writer, write_atomic

__all__ = ["atomic_writer", "write_atomic", "CheckpointError", "FORMAT_VERSION", "checkpoint_path", "list_checkpoints",
           "load", "load_latest", "load_rank_state", "rank_state_path", "save", "save_rank_state"]


def __getattr__(name: str):
    if name in __all__:
        from genfoundry.checkpoint import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'genfoundry.checkpoint' has no attribute '{name}'")
