"""Random access into packed shards, from a local directory or any fsspec URL.

Remote shards are copied whole into a local cache on first use and checked against the SHA-256 in
index.json: training reads every sample of a shard many times, so one verified copy beats ranged
requests over the network. Cached files carry the first hex digits of their checksum in their name, so
a shard set packed again under the same URL never serves stale cached bytes.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import os
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from genfoundry.checkpoint.storage import atomic_writer
from genfoundry.shards.index import (INDEX_NAME, ShardError, check_dataset_index, read_shard_index, sha256_bytes,
                                     sha256_file)

MAX_OPEN_FILES = 64  # a reader jumping across thousands of shards must not exhaust file descriptors
MAX_CACHED_OFFSETS = 256  # shards whose offsets stay loaded: 32 bytes a sample adds up in every worker


def default_cache_dir(url: str) -> Path:
    base = os.environ.get("GENFOUNDRY_CACHE") or Path.home() / ".cache" / "genfoundry"
    return Path(base) / "shards" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _pread(fd: int, length: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, length, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # platforms without pread; callers hold the dataset's lock
    return os.read(fd, length)


def _cached_name(name: str, sha256: str) -> str:
    stem, dot, ext = name.partition(".")
    return f"{stem}.{sha256[:16]}{dot}{ext}"


class ShardDataset:
    """The samples of a packed shard set by global index: `read(i) -> (image bytes, metadata dict)`.

    `url` is a local directory, a file:// URL, or any fsspec URL (s3://, gs://, memory://, ...).
    Remote shards are copied to `cache_dir` (default $GENFOUNDRY_CACHE/shards/<hash of url>).
    """

    def __init__(self, url: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.url = os.fspath(url)
        scheme = urlparse(self.url).scheme if "://" in self.url else ""
        self.fs, self.cache = None, None
        if scheme in ("", "file"):
            self.root = Path(url2pathname(urlparse(self.url).path) if scheme else os.path.expanduser(self.url))
            path = self.root / INDEX_NAME
            if not path.is_file():
                raise ShardError(f"no {INDEX_NAME} in '{self.root}'; pack images there first: "
                                 f"genfoundry pack SRC {self.root}")
            try:
                text = path.read_bytes()
            except OSError as e:
                raise ShardError(f"cannot read '{path}': {e.strerror or e}") from None
        else:
            try:
                import fsspec

                self.fs, root = fsspec.core.url_to_fs(self.url)
            except ImportError as e:
                raise ShardError(f"reading '{self.url}' needs fsspec and the package for '{scheme}://' "
                                 f"(pip install 'genfoundry[remote]'): {e}") from None
            except ValueError as e:  # fsspec's answer to a protocol it does not know
                raise ShardError(f"cannot open '{self.url}': {e}") from None
            self.root = root.rstrip("/")
            self.cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.url)
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ShardError(f"cannot create the shard cache '{self.cache}': {e.strerror or e}") from None
            try:
                text = self.fs.cat_file(self._remote(INDEX_NAME))
            except FileNotFoundError:
                raise ShardError(f"no {INDEX_NAME} at '{self.url}'; is it a packed shard set?") from None
            except OSError as e:
                raise ShardError(f"cannot read {INDEX_NAME} at '{self.url}': {e.strerror or e}") from None
        try:
            self.index = json.loads(text)
        except ValueError as e:
            raise ShardError(f"{INDEX_NAME} of '{self.url}' is not valid JSON: {e}") from None
        check_dataset_index(self.index, self.url)
        self.shards: list[dict] = self.index["shards"]
        self.class_names: list[str] = self.index["class_names"]
        self.num_samples: int = self.index["num_samples"]
        self.options: dict = self.index.get("options", {})
        self._starts = [s["first_sample"] for s in self.shards]
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._reset_handles()

    # -- locating files -----------------------------------------------------------------------------

    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _fetch(self, name: str, sha256: str) -> Path:
        """The local copy of shard file `name`; a remote one is copied and verified on first use."""
        if self.fs is None:
            path = self.root / name
            if not path.is_file():
                raise ShardError(f"{name} is missing from '{self.root}'")
            return path
        path = self.cache / _cached_name(name, sha256)
        if path.is_file():
            return path
        # Hashed while it streams in; a copy that does not match is never renamed into place. Concurrent
        # readers may each fetch: the rename makes either copy whole.
        try:
            with atomic_writer(path) as f, self.fs.open(self._remote(name), "rb") as remote:
                h = hashlib.sha256()
                for block in iter(lambda: remote.read(1 << 20), b""):
                    h.update(block)
                    f.write(block)
                if h.hexdigest() != sha256:
                    raise ShardError(f"{name} at '{self.url}' does not match its checksum in {INDEX_NAME} "
                                     f"(sha256 {h.hexdigest()[:12]}..., expected {sha256[:12]}...)")
        except FileNotFoundError:
            raise ShardError(f"{name} is missing at '{self.url}'") from None
        return path

    def _load_offsets(self, shard: int) -> np.ndarray:
        s = self.shards[shard]
        data = self._fetch(s["index"], s["index_sha256"]).read_bytes()
        # Checked locally too: it catches an index file from another pack next to a stale index.json.
        if sha256_bytes(data) != s["index_sha256"]:
            raise ShardError(f"{s['index']} does not match its checksum in {INDEX_NAME}; pack again")
        idx = read_shard_index(data, s["index"])
        offsets = np.asarray(idx["offsets"], dtype=np.int64).reshape(-1, 4)
        if len(offsets) != s["num_samples"] or (len(offsets) and offsets[-1, 2] + offsets[-1, 3] > s["bytes"]):
            raise ShardError(f"{s['index']} does not fit {s['name']} as described in {INDEX_NAME}; pack again")
        return offsets

    # -- file handles, per process ------------------------------------------------------------------

    def _reset_handles(self) -> None:
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _shard_offsets(self, shard: int) -> np.ndarray:
        offsets = self._offsets.get(shard)
        if offsets is not None:
            self._offsets.move_to_end(shard)
            return offsets
        offsets = self._offsets[shard] = self._load_offsets(shard)
        while len(self._offsets) > MAX_CACHED_OFFSETS:
            self._offsets.popitem(last=False)
        return offsets

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        s = self.shards[shard]
        fd = os.open(self._fetch(s["name"], s["sha256"]), os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._fds[shard] = fd
        while len(self._fds) > MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                os.close(fd)
        self._reset_handles()

    def __getstate__(self):  # picklable into worker processes: descriptors, lock and caches stay behind
        state = self.__dict__.copy()
        for name in ("_fds", "_lock", "_pid", "_offsets"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._offsets = OrderedDict()
        self._reset_handles()

    # -- the API ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"ShardDataset({self.url!r}, {self.num_samples} samples in {len(self.shards)} shards)"

    def shard_of(self, index: int) -> tuple[int, int]:
        """(shard number, position in that shard) of global sample `index`."""
        index = operator.index(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside 0..{self.num_samples - 1}")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def read(self, index: int) -> tuple[bytes, dict]:
        """(image bytes as packed, metadata) of global sample `index`, with one ranged read."""
        if os.getpid() != self._pid:
            # Descriptors inherited through fork share their owner's state; the lock may be held there.
            self._reset_handles()
        shard, pos = self.shard_of(index)
        # Held across the read so that another thread cannot close (and the OS reuse) this descriptor.
        with self._lock:
            image_at, image_size, meta_at, meta_size = (int(v) for v in self._shard_offsets(shard)[pos])
            length = meta_at + meta_size - image_at  # image, padding, JSON header, JSON: adjacent in the tar
            blob = _pread(self._fd(shard), length, image_at)
        if len(blob) != length:
            raise ShardError(f"{self.shards[shard]['name']} is truncated (sample {index}); run verify()")
        try:
            meta = json.loads(blob[meta_at - image_at:])
        except ValueError:
            raise ShardError(f"{self.shards[shard]['name']} holds unreadable metadata for sample {index}; "
                             f"run verify()") from None
        return blob[:image_size], meta

    def __getitem__(self, index: int) -> tuple[bytes, dict]:
        return self.read(index)

    def verify(self, checksums: bool = True) -> list[str]:
        """Problems found, one line each: a missing shard, or a size or checksum unlike index.json.

        For a remote set, shards not yet cached are fetched (and so checked); cached copies are
        hashed again, and one that no longer matches is removed so that the next read fetches it anew.
        `checksums=False` checks a local set's files and sizes only: a stat per file, for a check at start.
        """
        problems = []
        for s in self.shards:
            for name, sha256, size in ((s["name"], s["sha256"], s["bytes"]), (s["index"], s["index_sha256"], None)):
                if self.fs is not None:
                    if not checksums:
                        continue
                    problems += self._verify_cached(name, sha256)
                    continue
                path = self.root / name
                if not path.is_file():
                    problems.append(f"{name} is missing from '{self.root}'")
                elif size is not None and path.stat().st_size != size:
                    problems.append(f"{name} has {path.stat().st_size} bytes, {INDEX_NAME} says {size}")
                elif checksums and sha256_file(path) != sha256:
                    problems.append(f"{name} does not match its checksum in {INDEX_NAME}")
        return problems

    def _verify_cached(self, name: str, sha256: str) -> list[str]:
        path = self.cache / _cached_name(name, sha256)
        if path.is_file() and sha256_file(path) != sha256:
            path.unlink()
            return [f"the cached copy of {name} in '{self.cache}' did not match its checksum; removed"]
        try:
            self._fetch(name, sha256)
        except ShardError as e:
            return [str(e)]
        return []
