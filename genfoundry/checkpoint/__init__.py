"""Checkpoints and durable files, in tiers: `storage` (the one atomic-write helper, plain Python),
`manifest` (per-file sizes and SHA-256, written last), `tiers` (host staging, local disk, fsspec remote)
and `manager` (`CheckpointManager`: async saves, the newest good checkpoint, per-rank files, shards).

`from genfoundry import checkpoint; checkpoint.CheckpointManager(...)` reaches the manager; it imports
torch on first use, so `checkpoint.storage` and `checkpoint.manifest` stay light.
"""

from genfoundry.checkpoint.manifest import CheckpointError, checkpoint_name, verify
from genfoundry.checkpoint.storage import atomic_writer, write_atomic

__all__ = ["atomic_writer", "write_atomic", "CheckpointError", "checkpoint_name", "verify", "CheckpointManager",
           "FAULT_KILL_IN_WRITE", "read_state"]


def __getattr__(name: str):
    if name in __all__:
        from genfoundry.checkpoint import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'genfoundry.checkpoint' has no attribute '{name}'")
