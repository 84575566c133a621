"""A checkpoint's manifest: written last, it names every file with its size and SHA-256. A checkpoint
directory without one is torn (its save was interrupted); one whose files do not match is corrupt.

Plain Python (no torch): the remote tier and tools read manifests without it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from genfoundry.checkpoint.storage import write_atomic
from genfoundry.errors import GenfoundryError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
KINDS = ("full", "snapshot")
_NAME = re.compile(r"^(full|snapshot)-(\d{9})$")


class CheckpointError(GenfoundryError):
    """A checkpoint that cannot be used; the message says which and why."""


def checkpoint_name(kind: str, step: int) -> str:
    return f"{kind}-{step:09d}"


def parse_name(name: str) -> tuple[str, int] | None:
    """(kind, step) of a checkpoint directory's name, or None for anything else."""
    match = _NAME.match(name)
    return (match.group(1), int(match.group(2))) if match else None


class HashingWriter:
    """A binary file object that hashes what passes through it: a checksum without reading back."""

    def __init__(self, f, on_write=None):
        self.f, self.sha, self.size, self.on_write = f, hashlib.sha256(), 0, on_write

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.on_write is not None:
            self.on_write(self.size)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def entry(self) -> dict:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def file_entry(path: Path) -> dict:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
            size += len(block)
    return {"bytes": size, "sha256": sha.hexdigest()}


def write_manifest(directory: Path, kind: str, step: int, files: dict[str, dict], **meta) -> dict:
    """Records `files` ({relative path: file_entry}) and `meta` (under "meta"); files not named yet
    (those torch.distributed.checkpoint wrote) are hashed here."""
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in files and rel != MANIFEST:
            files[rel] = file_entry(path)
    manifest = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, "time": time.time(),
                "files": dict(sorted(files.items())), "meta": meta}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST} (its save was interrupted)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a genfoundry checkpoint manifest of format {FORMAT_VERSION}")
    return manifest


def verify(directory: Path, checksums: bool = True) -> dict:
    """The manifest of a whole checkpoint; CheckpointError names the first file that is missing, of
    another size or (with `checksums`) of another SHA-256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, entry in manifest["files"].items():
        path = directory / rel
        try:
            size = path.stat().st_size
        except OSError:
            raise CheckpointError(f"{directory}: {rel} is missing") from None
        if size != entry["bytes"]:
            raise CheckpointError(f"{directory}: {rel} has {size} bytes, its manifest says {entry['bytes']}")
        if checksums and file_entry(path)["sha256"] != entry["sha256"]:
            raise CheckpointError(f"{directory}: {rel} does not match its SHA-256 (the file is corrupt)")
    return manifest
