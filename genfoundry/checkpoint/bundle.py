"""The training state bundle: atomic save, newest-valid load with weights_only=True, pruning."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from genfoundry.checkpoint.storage import atomic_writer
from genfoundry.errors import GenfoundryError

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(GenfoundryError):
    """A checkpoint that cannot be used; the message says which and why."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.pt"


def save(bundle: dict, directory: str | Path, step: int, keep: int = 2) -> Path:
    """Writes the bundle under a temporary name, syncs it, then renames: a crash never leaves a torn file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    _atomic_save(bundle, path)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        for rank_file in directory.glob(f"{old.stem}.rank*.pt"):
            rank_file.unlink(missing_ok=True)
    return path


def rank_state_path(directory: str | Path, step: int, rank: int) -> Path:
    return Path(directory) / f"step-{step:09d}.rank{rank}.pt"


def save_rank_state(state: dict, directory: str | Path, step: int, rank: int) -> Path:
    """State that differs between ranks (e.g. compression residuals), beside the step's bundle.

    Written before the bundle, so a bundle that exists has its rank files; pruned with it."""
    path = rank_state_path(directory, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(state, path)
    return path


def _atomic_save(state: dict, path: Path) -> None:
    with atomic_writer(path) as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def load_rank_state(directory: str | Path, step: int, rank: int, map_location="cpu") -> dict | None:
    path = rank_state_path(directory, step, rank)
    return load(path, map_location) if path.is_file() else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of interrupted saves are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load(path: str | Path, map_location="cpu") -> dict:
    try:
        bundle = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(bundle, dict) or bundle.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {bundle.get('format_version') if isinstance(bundle, dict) else None}, expected {FORMAT_VERSION}")
    return bundle


def load_latest(directory: str | Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that loads; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path, map_location)
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None
