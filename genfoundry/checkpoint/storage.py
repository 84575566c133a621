"""The one way genfoundry writes a file that must never be seen half-written: a temporary name beside
it, fsync, rename, then fsync of the directory. A crash mid-write leaves the last good file in place.

Plain Python only: shard-packing workers use it without importing torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename: hidden, and unique to this process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


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
