"""`CheckpointManager`: saves that barely pause training, and the newest good checkpoint to resume from.

A save stages the state to host memory (`HostStaging`) and returns; a writer thread then assembles the
checkpoint directory on the local disk (every rank its own files, rank 0 the shared state and, after
all ranks are done, the manifest and the rename), and an upload thread copies it to the remote tier.
Under FSDP2 the sharded part goes through `torch.distributed.checkpoint.async_save`, which stages it
itself. A failed write or upload is reported and counted, never raised into the training step.

Collectives of the writer thread, and those of DCP's save thread, run on gloo groups of their own,
made on every rank at construction, so they never meet the training step's collectives or each
other (and work beside NCCL).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genfoundry import accel
from genfoundry.checkpoint import manifest as mf
from genfoundry.checkpoint.manifest import CheckpointError
from genfoundry.checkpoint.storage import atomic_writer
from genfoundry.checkpoint.tiers import HostStaging, LocalTier, RemoteTier

STATE = "state.pt"          # rank 0: the shared training state (and the whole weights, unsharded)
SHARDS = "dcp"              # FSDP2: torch.distributed.checkpoint's files
SNAPSHOT_WEIGHTS = "ema.safetensors"
SNAPSHOT_META = "model.json"
# Fault injection for `genfoundry chaos`: "STEP:RANK:MARKER" makes rank RANK kill itself (SIGKILL) in the
# middle of writing the full checkpoint of step STEP, once (MARKER is created first).
FAULT_KILL_IN_WRITE = "GENFOUNDRY_FAULT_KILL_IN_WRITE"
BACKGROUND_NICE = 19  # writer and upload threads run at the lowest CPU priority: training comes first


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclass
class _Job:
    kind: str
    step: int
    shared: dict | None
    per_rank: dict | None
    future: object = None
    meta: dict = field(default_factory=dict)
    started: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    record: dict = field(default_factory=dict)
    error: str | None = None  # staging failed: the writer reports it, and still meets the other ranks


class CheckpointManager:
    """The tiers of one run's checkpoints in `directory`, for this rank."""

    def __init__(self, directory: str | Path, device: torch.device, *, keep: int = 2, keep_snapshots: int = 3,
                 remote: str = "", keep_remote: int = 2, retries: int = 3, asynchronous: bool = True,
                 warn=None):
        self.rank, self.world = accel.rank(), accel.world_size()
        self.local = LocalTier(directory, {"full": keep, "snapshot": keep_snapshots})
        self.remote = RemoteTier(remote, {"full": keep_remote, "snapshot": keep_remote}, retries) if remote else None
        self.asynchronous = asynchronous
        self.warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
        self.staging = {kind: HostStaging(device) for kind in mf.KINDS}
        # The writer thread's gathers and DCP's own save thread each have a gloo group: two threads
        # issuing collectives on one group could meet them in another order on another rank.
        self.group = torch.distributed.new_group(backend="gloo") if accel.distributed() else None
        self.dcp_group = torch.distributed.new_group(backend="gloo") if accel.distributed() else None
        self.failures: list[str] = []
        self.records: list[dict] = []  # per save: kind, step, stall_s, durable_s (on rank 0)
        self._pending: dict[str, _Job | None] = dict.fromkeys(mf.KINDS)
        self._newest_upload: dict[str, int] = dict.fromkeys(mf.KINDS, -1)
        self._jobs: queue.Queue = queue.Queue()
        self._uploads: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, args=(self._jobs, self._write), daemon=True,
                                          name="genfoundry-checkpoint-writer")]
        if self.remote is not None and self.rank == 0:
            self._threads.append(threading.Thread(target=self._work, args=(self._uploads, self._upload), daemon=True,
                                                  name="genfoundry-checkpoint-upload"))
        for thread in self._threads:
            thread.start()

    # ---- saving ---------------------------------------------------------------------------------

    def save(self, kind: str, step: int, shared: dict | None = None, per_rank: dict | None = None,
             sharded: dict | None = None, **meta) -> float:
        """Stages one checkpoint and hands it to the writer; returns the seconds training paused.

        `shared` (rank 0's: one file for all), `per_rank` (this rank's own file), `sharded` (DTensors,
        saved by every rank through torch.distributed.checkpoint). Every rank calls it for every save.
        `meta` goes into the manifest (and, for a snapshot, into its model.json)."""
        started = time.perf_counter()
        previous = self._pending[kind]
        if previous is not None:  # its buffers are about to be reused: a save only waits for a slower disk
            previous.done.wait()
        staged_shared = staged_rank = future = error = None
        try:
            if shared is not None or per_rank is not None:
                staged_shared, staged_rank = self.staging[kind].stage([shared, per_rank])
            if sharded is not None:
                from torch.distributed.checkpoint import FileSystemWriter, async_save

                writer = FileSystemWriter(self.local.partial(kind, step) / SHARDS, sync_files=True)
                future = async_save(sharded, storage_writer=writer, process_group=self.dcp_group)
                future = getattr(future, "upload_completion", future)
        except (OSError, RuntimeError) as e:  # out of host memory, a full or read-only disk
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        job = _Job(kind, step, staged_shared, staged_rank, future, meta, started, error=error)
        job.record = {"kind": kind, "step": step, "stall_s": None, "durable_s": None}
        self.records.append(job.record)
        self._pending[kind] = job
        if self.asynchronous:
            self._jobs.put(job)
        else:
            self._run(job, self._write)
        job.record["stall_s"] = stall = time.perf_counter() - started
        return stall

    def before_update(self) -> None:
        """Call before the optimizer changes the weights: the staged copies must be complete."""
        for staging in self.staging.values():
            staging.wait()

    def wait(self, uploads: bool = True) -> list[str]:
        """Blocks until every queued save is durable locally (and, with `uploads`, uploaded); the
        failures so far."""
        self._jobs.join()
        if uploads:
            self._uploads.join()
        return list(self.failures)

    def close(self, wait: bool = True) -> None:
        """Waits for every save (unless not `wait`: after an error, when a peer may be gone), then ends
        the threads and frees the host buffers."""
        if wait:
            self.wait()
        for q in (self._jobs, self._uploads):
            q.put(None)
        for thread in self._threads if wait else ():
            thread.join()
        self._pending = dict.fromkeys(mf.KINDS)
        self.staging = {kind: HostStaging(staging.device) for kind, staging in self.staging.items()}

    def _work(self, jobs: queue.Queue, handle) -> None:
        try:  # Linux: this thread alone yields the cores to training (a thread's nice value is its own)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except (AttributeError, OSError):
            pass
        while (job := jobs.get()) is not None:
            try:
                self._run(job, handle)
            finally:
                jobs.task_done()

    def _run(self, job: _Job, handle) -> None:
        try:
            handle(job)
        except Exception as e:  # noqa: BLE001 - reported; a checkpoint never stops training
            self._fail(f"{job.kind} checkpoint of step {job.step}: {type(e).__name__}: {e}")
        finally:
            job.done.set()

    def _fail(self, line: str) -> None:
        self.failures.append(line)
        self.warn(line)

    def _write(self, job: _Job) -> None:
        files, error = {}, job.error
        try:
            if error is None:
                self._write_files(job, files)
        except Exception as e:  # noqa: BLE001 - every rank still meets the others below
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        if job.future is not None:  # DCP's collectives end before this thread's gather begins
            try:
                job.future.result()
            except Exception as e:  # noqa: BLE001 - as above
                error = error or f"rank {self.rank}: {type(e).__name__}: {e}"
        gathered = [(files, error)]
        if self.group is not None:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, (files, error), group=self.group)
        errors = [e for _, e in gathered if e]
        if errors:
            raise CheckpointError("; ".join(errors))
        if self.rank == 0:
            entries = {k: v for f, _ in gathered for k, v in f.items()}
            self.local.commit(job.kind, job.step, entries, world_size=self.world, **job.meta)
            job.record["durable_s"] = time.perf_counter() - job.started
            if self.remote is not None:
                self.local.protected.add(self.local.path(job.kind, job.step))
                self._newest_upload[job.kind] = job.step
                self._uploads.put(_Job(job.kind, job.step, None, None))

    def _write_files(self, job: _Job, files: dict) -> None:
        """This rank's files of one save, into the partial directory; their entries go into `files`."""
        self.staging[job.kind].wait()
        if job.shared is not None and self.rank == 0:
            files.update(self._write_shared(job, self.local.partial(job.kind, job.step)))
        if job.per_rank is not None:
            path = self.local.partial(job.kind, job.step) / rank_file(self.rank)
            files[rank_file(self.rank)] = self._write_torch(job.per_rank, path, job)

    def _write_shared(self, job: _Job, partial: Path) -> dict[str, dict]:
        if job.kind == "full":
            return {STATE: self._write_torch(job.shared, partial / STATE, job)}
        from safetensors.torch import save as safetensors_bytes

        entries = {}
        for name, data in ((SNAPSHOT_WEIGHTS, safetensors_bytes({k: v.contiguous() for k, v in job.shared.items()})),
                           (SNAPSHOT_META, json.dumps({**job.meta, "step": job.step}, indent=2).encode())):
            with atomic_writer(partial / name) as f:
                out = mf.HashingWriter(f)
                out.write(data)
            entries[name] = out.entry()
        return entries

    def _write_torch(self, state: dict, path: Path, job: _Job) -> dict:
        with atomic_writer(path) as f:
            out = mf.HashingWriter(f, _fault_hook(job.kind, job.step, self.rank))
            torch.save({"format_version": mf.FORMAT_VERSION, **state}, out)
        return out.entry()

    def _upload(self, job: _Job) -> None:
        path = self.local.path(job.kind, job.step)
        try:
            if job.step < self._newest_upload[job.kind]:
                return  # a newer one of its kind is queued: a slow remote gets the newest, the disk stays bounded
            self.remote.upload(path)
        except Exception as e:  # noqa: BLE001 - reported and counted; the local tier still has it
            self._fail(f"upload of the {job.kind} checkpoint of step {job.step} to {self.remote.url} failed after "
                       f"{self.remote.retries} attempt(s): {type(e).__name__}: {e}")
        finally:
            self.local.protected.discard(path)
            self.local.prune(job.kind)  # what this upload held back

    # ---- loading --------------------------------------------------------------------------------

    def clean(self) -> list[str]:
        """Rank 0, before any save of this run: removes what interrupted saves left behind."""
        removed = self.local.clean() if self.rank == 0 else []
        if removed:
            self.warn(f"removed {len(removed)} leftover(s) of interrupted saves in {self.local.root}: "
                      f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
        return removed

    def newest(self, kind: str = "full") -> int | None:
        """Rank 0: the newest step of `kind` whose checksums verify, from the fastest tier that has one
        (a remote one newer than every good local one is downloaded first). Torn and corrupt
        checkpoints are reported and skipped."""
        local = None
        for step in reversed(self.local.steps(kind)):
            try:
                mf.verify(self.local.path(kind, step))
                local = step
                break
            except CheckpointError as e:
                self.warn(f"skipping {e}")
        if self.remote is None:
            return local
        try:
            remote = [s for s in self.remote.complete(kind) if local is None or s > local]
        except Exception as e:  # noqa: BLE001 - an unreachable remote leaves the local tier
            self.warn(f"cannot list the remote checkpoints at {self.remote.url}: {type(e).__name__}: {e}")
            return local
        for step in reversed(remote):
            try:
                self.remote.download(kind, step, self.local)
                print(f"fetched the {kind} checkpoint of step {step} from {self.remote.url}", file=sys.stderr)
                return step
            except Exception as e:  # noqa: BLE001 - any remote failure: the next one, or the local tier
                self.warn(f"skipping the remote checkpoint of step {step}: {type(e).__name__}: {e}")
        return local

    def path(self, kind: str, step: int) -> Path:
        return self.local.path(kind, step)

    def read(self, step: int, name: str = STATE) -> dict | None:
        """One torch file of the full checkpoint of `step` (None if the checkpoint has no such file)."""
        path = self.local.path("full", step) / name
        return read_state(path) if path.is_file() else None

    def load_sharded(self, step: int, state: dict) -> None:
        """Fills `state` (DTensors of this world size) in place from the checkpoint's shards, resharding."""
        from torch.distributed.checkpoint import FileSystemReader, load

        load(state, storage_reader=FileSystemReader(self.local.path("full", step) / SHARDS),
             process_group=self.dcp_group, no_dist=self.dcp_group is None)


def read_state(path: str | Path) -> dict:
    """A torch file of a checkpoint (`state.pt`, `rank-NNNNN.pt`), loaded with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not readable: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != mf.FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a genfoundry state of format {mf.FORMAT_VERSION}")
    return state


def _fault_hook(kind: str, step: int, rank: int):
    """The write callback that carries out FAULT_KILL_IN_WRITE for this save, or None."""
    spec = os.environ.get(FAULT_KILL_IN_WRITE)
    if not spec or kind != "full":
        return None
    at_step, at_rank, marker = spec.split(":", 2)
    if int(at_step) != step or int(at_rank) != rank or os.path.exists(marker):
        return None

    def kill(written: int) -> None:
        if written >= 1 << 16:  # part of the file is on its way to disk, the manifest is not
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    return kill
