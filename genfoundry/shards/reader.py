"""Random access into packed shards, local or behind any fsspec URL (copied to a local cache once)."""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from genfoundry.shards.index import FORMAT_VERSION, ShardError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardDataset:
    """Samples of a packed shard set by global index: `read(i) -> (image bytes, metadata)`."""

    def __init__(self, url: str, cache_dir: str | None = None):
        self.url = str(url)
        self.remote = "://" in self.url and not self.url.startswith("file://")
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            base = cache_dir or os.environ.get("GENFOUNDRY_CACHE") or Path.home() / ".cache" / "genfoundry"
            self.local = Path(base) / "shards" / key
            self.local.mkdir(parents=True, exist_ok=True)
            try:
                index_text = self.fs.cat_file(f"{self.root}/index.json").decode()
            except FileNotFoundError:
                raise ShardError(f"no index.json at '{self.url}'; is it a packed shard set?") from None
        else:
            self.local = Path(self.url.removeprefix("file://"))
            if not (self.local / "index.json").is_file():
                raise ShardError(f"no index.json in '{self.local}'; pack images there with `genfoundry pack`")
            index_text = (self.local / "index.json").read_text()
        self.index = json.loads(index_text)
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"'{self.url}' has shard format {self.index.get('format_version')}, expected {FORMAT_VERSION}")
        self.shards = self.index["shards"]
        self.class_names = self.index["class_names"]
        self.num_samples = self.index["num_samples"]
        self._starts = [s["first_sample"] for s in self.shards]
        self._offsets: dict[int, np.ndarray] = {}
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.num_samples

    def shard_of(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside 0..{self.num_samples - 1}")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _local_shard(self, shard: int) -> Path:
        name = self.shards[shard]["name"]
        path = self.local / name
        if self.remote and not path.is_file():
            tmp = path.with_name(f".{name}.tmp{os.getpid()}")
            self.fs.get_file(f"{self.root}/{name}", str(tmp))
            digest = _sha256(tmp)
            if digest != self.shards[shard]["sha256"]:
                tmp.unlink()
                raise ShardError(f"{self.url}/{name} does not match its checksum in index.json")
            os.replace(tmp, path)
            offsets = name.replace(".tar", ".offsets.npy")
            self.fs.get_file(f"{self.root}/{offsets}", str(self.local / offsets))
        return path

    def read(self, index: int) -> tuple[bytes, dict]:
        if os.getpid() != self._pid:  # handles opened before a fork are not shared with the child
            self._files, self._pid = {}, os.getpid()
        shard, pos = self.shard_of(index)
        if shard not in self._files:
            path = self._local_shard(shard)
            self._offsets[shard] = np.load(path.with_name(path.name.replace(".tar", ".offsets.npy")))
            self._files[shard] = open(path, "rb")
        image_at, image_size, json_at, json_size = (int(v) for v in self._offsets[shard][pos])
        f = self._files[shard]
        # The image member and its JSON are adjacent, so one read covers both.
        f.seek(image_at)
        blob = f.read(json_at + json_size - image_at)
        return blob[:image_size], json.loads(blob[json_at - image_at:])

    def verify(self) -> list[str]:
        """Problems found: a missing shard, or a size or checksum that does not match index.json."""
        problems = []
        for number, s in enumerate(self.shards):
            try:
                path = self._local_shard(number)
            except (ShardError, FileNotFoundError) as e:
                problems.append(str(e))
                continue
            if not path.is_file():
                problems.append(f"{s['name']} is missing")
            elif path.stat().st_size != s["bytes"]:
                problems.append(f"{s['name']} has {path.stat().st_size} bytes, index.json says {s['bytes']}")
            elif _sha256(path) != s["sha256"]:
                problems.append(f"{s['name']} does not match its checksum")
        return problems

    def __getstate__(self):  # picklable into worker processes: open files stay behind
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
