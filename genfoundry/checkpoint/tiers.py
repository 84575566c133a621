"""The three tiers a checkpoint passes through, fastest first.

- `HostStaging` (memory): the state is copied into host buffers kept from one save to the next (pinned,
  and on a side stream, where the device has them). Training goes on as soon as the copy is queued;
  `wait()` must come before the next optimizer update changes what is being copied.
- `LocalTier`: checkpoint directories on the local disk, each assembled under a hidden partial name and
  renamed into place after its manifest; the newest `keep` of each kind are kept.
- `RemoteTier`: any fsspec URL; a checkpoint is uploaded file by file, its manifest last, so a remote
  checkpoint without a manifest is torn. The newest `keep` of each kind are kept there too.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch

from genfoundry.checkpoint import manifest as mf
from genfoundry.checkpoint.storage import commit_directory, partial_directory, remove_leftovers, write_atomic


class HostStaging:
    """Host copies of a state tree (nested dicts and lists of tensors and plain values)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type not in ("cpu", "meta") and torch.accelerator.is_available()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.buffers: dict[str, torch.Tensor] = {}
        self.event = None
        self.bytes = 0

    def stage(self, tree):
        """A copy of `tree` whose tensors are host buffers; copies from the device are queued, not
        waited for. Buffers are reused when the next save has the same shapes."""
        self.bytes = 0
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                staged = self._copy(tree, "")
                self.event = torch.cuda.Event()
                self.event.record(self.stream)
        else:
            staged = self._copy(tree, "")
        return staged

    def wait(self) -> None:
        """Blocks until every queued copy is done."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def _copy(self, node, key: str):
        if isinstance(node, torch.Tensor):
            return self._tensor(node, key)
        if isinstance(node, dict):
            return {k: self._copy(v, f"{key}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(self._copy(v, f"{key}/{i}") for i, v in enumerate(node))
        return copy.deepcopy(node)

    def _tensor(self, t: torch.Tensor, key: str) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pinned and t.device.type != "cpu")
            self.buffers[key] = buf
        buf.copy_(t, non_blocking=buf.is_pinned())
        if self.stream is not None and t.is_cuda:
            t.record_stream(self.stream)  # not reused by the allocator before the side stream has read it
        self.bytes += buf.numel() * buf.element_size()
        return buf


class LocalTier:
    """Checkpoint directories `kind-NNNNNNNNN/` under `root`, newest `keep[kind]` kept."""

    def __init__(self, root: str | Path, keep: dict[str, int]):
        self.root, self.keep = Path(root), keep
        self.protected: set[Path] = set()  # not pruned yet: an upload is still reading them

    def path(self, kind: str, step: int) -> Path:
        return self.root / mf.checkpoint_name(kind, step)

    def partial(self, kind: str, step: int) -> Path:
        """The directory a save assembles in (every rank writes into the same one)."""
        path = partial_directory(self.path(kind, step))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, kind: str, step: int, files: dict[str, dict], **meta) -> Path:
        partial = partial_directory(self.path(kind, step))
        mf.write_manifest(partial, kind, step, files, **meta)
        commit_directory(partial, self.path(kind, step))
        self.prune(kind)
        return self.path(kind, step)

    def steps(self, kind: str) -> list[int]:
        """Steps with a directory of this kind, oldest first (whole or not: `verify` tells)."""
        if not self.root.is_dir():
            return []
        parsed = [mf.parse_name(p.name) for p in self.root.iterdir() if p.is_dir()]
        return sorted(step for k, step in filter(None, parsed) if k == kind)

    def prune(self, kind: str) -> None:
        for step in self.steps(kind)[:-self.keep[kind]]:
            if self.path(kind, step) not in self.protected:
                shutil.rmtree(self.path(kind, step), ignore_errors=True)

    def clean(self) -> list[str]:
        return remove_leftovers(self.root)


class RemoteTier:
    """Checkpoints copied to an fsspec URL (`s3://bucket/run`, `file:///mnt/x`, `memory://run`, ...)."""

    def __init__(self, url: str, keep: dict[str, int], retries: int = 3, backoff_s: float = 1.0):
        try:
            import fsspec
        except ImportError:
            raise mf.CheckpointError(f"checkpoint.remote={url} needs fsspec: pip install 'genfoundry[remote]'") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as e:  # an unknown protocol, or its package is not installed
            raise mf.CheckpointError(f"checkpoint.remote={url} cannot be opened: {e}") from None
        self.url, self.keep, self.retries, self.backoff_s = url, keep, retries, backoff_s
        self.root = self.root.rstrip("/")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def upload(self, local: Path) -> None:
        """Copies one committed local checkpoint, data files first and the manifest last; retried with
        backoff, the last failure raised (the caller reports it)."""
        manifest = mf.read_manifest(local)
        name = local.name
        for attempt in range(self.retries):
            try:
                for rel in manifest["files"]:
                    target = self._join(name, rel)
                    self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.put_file(str(local / rel), target)
                self.fs.put_file(str(local / mf.MANIFEST), self._join(name, mf.MANIFEST))
                break
            except OSError:
                if attempt == self.retries - 1:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
        self.prune(manifest["kind"])

    def complete(self, kind: str) -> list[int]:
        """Steps of this kind whose manifest is at the remote, oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            parsed = mf.parse_name(entry.rstrip("/").rsplit("/", 1)[-1])
            if parsed and parsed[0] == kind and self.fs.exists(self._join(mf.checkpoint_name(kind, parsed[1]), mf.MANIFEST)):
                steps.append(parsed[1])
        return sorted(steps)

    def prune(self, kind: str) -> None:
        for step in self.complete(kind)[:-self.keep[kind]]:
            self.fs.rm(self._join(mf.checkpoint_name(kind, step)), recursive=True)

    def download(self, kind: str, step: int, local: LocalTier) -> Path:
        """Copies a remote checkpoint into the local tier (verified, then committed) and returns its path."""
        name = mf.checkpoint_name(kind, step)
        manifest = json.loads(self.fs.cat_file(self._join(name, mf.MANIFEST)))
        partial = local.partial(kind, step)
        for rel in manifest["files"]:
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._join(name, rel), str(partial / rel))
        write_atomic(partial / mf.MANIFEST, json.dumps(manifest).encode())
        try:
            mf.verify(partial)
        except mf.CheckpointError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        commit_directory(partial, local.path(kind, step))
        return local.path(kind, step)
