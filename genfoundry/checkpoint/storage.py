"""The one way genfoundry writes a file that must never be seen half-written: a temporary name beside
it, fsync, rename, then fsync of the directory. A crash mid-write leaves the last good file in place.

Plain Python only: shard-packing workers use it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


TEMPORARY = ".tmp"  # in the name of every file or directory that is still being written


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename: hidden, and unique to this process."""
    return path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}")


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it replaces `path` only when the block ends without an
    exception. On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` through `atomic_writer`."""
    with atomic_writer(path) as f:
        f.write(data)


def fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_directory(path: str | Path) -> Path:
    """Where the directory `path` is assembled before `commit_directory` renames it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMPORARY}")


def commit_directory(partial: Path, path: Path) -> None:
    """Makes a directory whose files are written and synced appear at `path` in one rename; a directory
    already there (the same step saved again) is moved aside first and removed after."""
    fsync_dir(partial)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old{TEMPORARY}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(partial, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(directory: str | Path) -> list[str]:
    """Removes what interrupted writes left in `directory` (temporary files and partial directories);
    returns their names. Only for a directory no process is writing into."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") and TEMPORARY in entry.name:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)
