"""The three ways `genfoundry bench checkpoint` saves the trainer's state, each with `save()`,
`before_update()` (before the optimizer step), `settle()` (until durable, untimed), `close()` and
`durable` (seconds per save)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from genfoundry.checkpoint.manifest import CheckpointError
from genfoundry.checkpoint.storage import atomic_writer

METHODS = ("torch_save", "dcp_async", "dcp_async_writer", "genfoundry")
LABELS = {"torch_save": "torch.save", "dcp_async": "DCP async_save", "dcp_async_writer": "DCP async (writer)",
          "genfoundry": "genfoundry tiers"}


def for_dcp(node, device: torch.device | None = None):
    """The tree as torch 2.11's DCP stagers take it: plain dicts (an OrderedDict reduces to its class,
    which they cannot copy) and, with `device`, its few host tensors (RNG state, AdamW step counts)
    moved there."""
    if isinstance(node, torch.Tensor):
        return node.to(device) if device is not None and node.device.type == "cpu" else node
    if isinstance(node, dict):
        return {k: for_dcp(v, device) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(for_dcp(v, device) for v in node)
    return node


class TorchSave:
    """(a) `torch.save` of the whole state, blocking until it is fsync'd and renamed into place."""

    config = "torch.save through atomic_writer (fsync, rename, directory fsync)"

    def __init__(self, run, directory: Path):
        self.run, self.directory, self.durable = run, directory, []

    def save(self) -> None:
        started = time.perf_counter()
        with atomic_writer(self.directory / f"state-{self.run.step:09d}.pt") as f:
            torch.save(self.run.state_dict(), f)
        self.durable.append(time.perf_counter() - started)

    def before_update(self) -> None:
        pass

    def settle(self) -> None:
        for old in sorted(self.directory.glob("state-*.pt"))[:-1]:  # the newest one is kept, as keep=1
            old.unlink()

    def close(self) -> None:
        pass


class DcpAsync:
    """(b) `torch.distributed.checkpoint.async_save`, single process, staged by a `DefaultStager`."""

    def __init__(self, run, directory: Path):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.run, self.directory, self.durable = run, directory, []
        self.staging = self.upload = None
        accelerated = run.device.type != "cpu"
        # Its best for one process: pinned buffers kept from one save to the next, copied on a side
        # stream in a thread while the step runs. Shared memory serves only the process-based checkpointer.
        options = StagingOptions(use_pinned_memory=accelerated, use_shared_memory=False, use_async_staging=True,
                                 use_non_blocking_copy=accelerated)
        self.stager = DefaultStager(options)
        self.config = (f"async_save(async_stager=DefaultStager({options})), thread checkpointer, "
                       f"FileSystemWriter(sync_files=True)"
                       + ("; the state's few host tensors moved to the device, which DCP's stager needs" if accelerated
                          else ""))

    def save(self) -> None:
        from torch.distributed.checkpoint import FileSystemWriter, async_save

        started = time.perf_counter()
        writer = FileSystemWriter(self.directory / f"step-{self.run.step:09d}", sync_files=True)
        # DCP's stager (torch 2.11) cannot stage host tensors beside device ones
        state = for_dcp(self.run.state_dict(), self.run.device if self.run.device.type != "cpu" else None)
        response = async_save(state, storage_writer=writer, async_stager=self.stager, no_dist=True)
        # With asynchronous staging torch returns both futures; the weights may change once staging is done.
        self.staging = getattr(response, "staging_completion", None)
        self.upload = getattr(response, "upload_completion", response)
        self.upload.add_done_callback(lambda _: self.durable.append(time.perf_counter() - started))

    def before_update(self) -> None:
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def settle(self) -> None:
        if self.upload is not None:
            self.upload.result()
            self.upload = None
        for old in sorted(self.directory.glob("step-*"))[:-1]:  # the newest one is kept, as keep=1
            shutil.rmtree(old)

    def close(self) -> None:
        self.settle()
        self.stager.close()


class DcpAsyncWriter(DcpAsync):
    """(b') `async_save` staged by its `FileSystemWriter` (`cache_staged_state_dict=True`: pinned host
    copies kept from one save to the next), the configuration torch's own examples use."""

    def __init__(self, run, directory: Path):
        self.run, self.directory, self.durable = run, directory, []
        self.staging = self.upload = None
        self.stager = None
        self.writer = None
        self.config = ("async_save(storage_writer=FileSystemWriter(sync_files=True, cache_staged_state_dict="
                       f"{run.device.type != 'cpu'}))")

    def save(self) -> None:
        from torch.distributed.checkpoint import FileSystemWriter, async_save

        started = time.perf_counter()
        path = self.directory / f"step-{self.run.step:09d}"
        if self.writer is None:  # one writer, so that its cached pinned copies serve every save
            self.writer = FileSystemWriter(path, sync_files=True,  # its cache pins, which needs an accelerator
                                           cache_staged_state_dict=self.run.device.type != "cpu")
        state = for_dcp(self.run.state_dict())
        self.upload = async_save(state, checkpoint_id=path, storage_writer=self.writer, no_dist=True)
        self.upload = getattr(self.upload, "upload_completion", self.upload)
        self.upload.add_done_callback(lambda _: self.durable.append(time.perf_counter() - started))

    def close(self) -> None:
        self.settle()


class Tiers:
    """(c) genfoundry's `CheckpointManager`, asynchronous, reached through `TrainerState.save_checkpoint`."""

    config = "CheckpointManager(asynchronous=True, keep=1) through TrainerState.save_checkpoint('full')"

    def __init__(self, run, directory: Path):
        from genfoundry.checkpoint.manager import CheckpointManager

        self.run, self.failures = run, []
        # keep=1: the disk holds one checkpoint and the one being written, as with the other methods.
        self.manager = CheckpointManager(directory, run.device, keep=1, asynchronous=True, warn=self.failures.append)
        run.checkpoints = self.manager

    @property
    def durable(self) -> list[float]:
        return [r["durable_s"] for r in self.manager.records]

    def save(self) -> None:
        self.run.save_checkpoint("full")

    def before_update(self) -> None:
        self.manager.before_update()

    def settle(self) -> None:
        self.manager.wait()
        if self.failures:
            raise CheckpointError(f"a genfoundry checkpoint failed: {self.failures[0]}")

    def close(self) -> None:
        self.settle()
        self.manager.close()
        self.run.checkpoints = None


SAVERS = {"torch_save": TorchSave, "dcp_async": DcpAsync, "dcp_async_writer": DcpAsyncWriter, "genfoundry": Tiers}
