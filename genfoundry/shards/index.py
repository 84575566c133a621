"""Names and small files shared by the packer and the reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_VERSION = 1


class ShardError(ValueError):
    """A source that cannot be packed or a shard set that cannot be read; the message says why."""


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
