"""The on-disk layout shared by the packer and the reader: names, index files, atomic writes, checks.

A packed directory holds, for shard number n:
  shard-{n:06d}.tar        WebDataset layout: {key}.{ext} then {key}.json for every sample
  shard-{n:06d}.idx.json   where each sample's two members start in the tar, plus the shard's record
and for the whole set `index.json` (written last) and `failures.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from genfoundry.errors import GenfoundryError

# 2: keep mode stores 16-bit, EXIF-rotated and CMYK JPEG inputs as PNG; index.json counts channels,
# image sizes, re-encoded and unlabelled samples; a folder without class folders is one class.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1 sets read as before; training then counts channels from the headers
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # archives end padded to a whole record, as tar(1) writes them
INDEX_NAME = "index.json"
FAILURES_NAME = "failures.jsonl"
SHARD_FILE = re.compile(r"^shard-(\d{6})\.(tar|idx\.json)$")
# Temporary names start with a dot so that globs like shard-*.tar never see half-written files.
TEMP_FILE = re.compile(r"^\.(shard-\d{6}\.(tar|idx\.json)|index\.json|failures\.jsonl)\.tmp\d+$")


class ShardError(GenfoundryError):
    """A source that cannot be packed or a shard set that cannot be read; the message says why."""


def tar_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def idx_name(number: int) -> str:
    return f"shard-{number:06d}.idx.json"


def sample_key(number: int) -> str:
    return f"{number:09d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_json(data) -> bytes:
    # Compact and key-ordered, so that the same pack always gives byte-identical index files.
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def read_shard_index(data: bytes, name: str) -> dict:
    """A per-shard index file, checked enough that a wrong offset cannot reach a read."""
    try:
        idx = json.loads(data)
    except ValueError as e:
        raise ShardError(f"{name} is not valid JSON ({e}); pack the shards again") from None
    if not isinstance(idx, dict) or idx.get("format_version") not in READABLE_VERSIONS:
        raise ShardError(f"{name} is not a format-{FORMAT_VERSION} shard index; pack the shards again")
    offsets = idx.get("offsets")
    if not isinstance(offsets, list) or len(offsets) != idx.get("num_samples"):
        raise ShardError(f"{name} lists {len(offsets or [])} offsets for {idx.get('num_samples')} samples")
    return idx


def check_dataset_index(index: dict, where: str) -> None:
    """The dataset index must be self-consistent before any sample number is mapped to a shard."""
    if not isinstance(index, dict) or index.get("format_version") not in READABLE_VERSIONS:
        found = index.get("format_version") if isinstance(index, dict) else None
        raise ShardError(f"'{where}' has shard format version {found}, this genfoundry reads "
                         f"{' and '.join(map(str, READABLE_VERSIONS))}; pack it again with this version")
    start = 0
    for s in index.get("shards", []):
        if s.get("first_sample") != start:
            raise ShardError(f"'{where}': {s.get('name')} starts at sample {s.get('first_sample')}, expected {start}")
        start += s["num_samples"]
    if start != index.get("num_samples"):
        raise ShardError(f"'{where}': the shards hold {start} samples, index.json says {index.get('num_samples')}")


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file, with fixed owner, mode and time.

    Written here rather than through tarfile so that the packer knows each member's data offset by
    construction; tests read the result back with tarfile.
    """
    encoded = name.encode()
    if len(encoded) > 100 or size >= 8 ** 11:
        raise ShardError(f"tar member '{name}' of {size} bytes does not fit a ustar header")
    header = bytearray(TAR_BLOCK)
    for offset, value in ((0, encoded), (100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"),
                          (124, b"%011o\0" % size), (136, b"00000000000\0"), (148, b" " * 8), (156, b"0"),
                          (257, b"ustar\0"), (263, b"00"), (329, b"0000000\0"), (337, b"0000000\0")):
        header[offset:offset + len(value)] = value
    header[148:155] = b"%06o\0" % sum(header)  # the checksum counts its own field as spaces
    return bytes(header)
