"""`curate()`: list the inputs, run the stages slice by slice, decide, and write the manifest.

The inputs, sorted, are cut into slices of `run.slice_size`. Each stage's work on a slice is a part
file under DIR/work/ named by the slice and stamped with a recipe (the slice's inputs and the options
the work depends on), so running again redoes only missing or stale parts, and torchrun ranks or Ray
tasks can each take their own slices. Decisions that need every slice (dedup, thresholds, the quality
Gaussian) are made afterwards from the parts, which hold facts and scores but no thresholds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from genfoundry.curation.config import CurateConfig
from genfoundry.curation import basic, examples, manifest
from genfoundry.curation.deep import Job, Models, score_slice
from genfoundry.curation.inputs import CurateError, Item, display, list_sources
from genfoundry.errors import writable_directory
from genfoundry.progress import bar

WORK = "work"


def recipe(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _identity(item: Item) -> list:
    if item.at is not None:
        return [item.source, *item.at]
    try:
        stat = os.stat(item.source)
        return [item.source, stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [item.source, None, None]


def _examine_chunk(args: tuple[list[Item], object]) -> list[dict]:
    items, rules = args
    return [basic.examine(item, rules) for item in items]


class Executor:
    """Where slices run: this process with a pool of decode workers, one of several torchrun ranks
    (each takes every world-th slice), or Ray tasks."""

    def __init__(self, workers: int, ray: bool = False, work: Path | None = None):
        self.workers = workers or os.cpu_count() or 1
        self.ray = ray
        self.work = work
        self.rank, self.world = 0, 1
        self.group, self.owns_group = None, False
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun, even with one rank
            from datetime import timedelta

            import torch.distributed as dist

            # A barrier waits for the slowest rank's share of a stage, which can take hours.
            timeout = timedelta(hours=24)
            self.owns_group = not dist.is_initialized()
            if self.owns_group:
                dist.init_process_group("gloo", timeout=timeout)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.group = dist.new_group(backend="gloo", timeout=timeout)  # CPU coordination: parts are files
        self._pool = None

    def mine(self, slices: range) -> list[int]:
        return [k for k in slices if k % self.world == self.rank]

    @property
    def pool(self):
        if self._pool is None and self.workers > 1:
            from multiprocessing import get_context

            # spawn, not fork: the caller may hold threads (torch, tqdm) a forked child would inherit locked.
            self._pool = get_context("spawn").Pool(self.workers)
        return self._pool

    def barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
        if self.owns_group:
            from genfoundry.distributed import parallel

            parallel.destroy_process_group()
            self.owns_group = False


def basic_slice(k: int, items: list[Item], rules, work: Path, key: str, pool=None, progress=None) -> None:
    """Stage 1 on one slice, written as its part file."""
    chunks = [(items[i:i + 32], rules) for i in range(0, len(items), 32)]
    rows = []
    for chunk_rows in (pool.imap(_examine_chunk, chunks) if pool else map(_examine_chunk, chunks)):
        rows.extend(chunk_rows)
        if progress:
            progress(len(chunk_rows))
    manifest.write_part(work, "basic", k, key, rows)


def deep_slice(k: int, items: list[Item], index: list[int], job: Job, models: Models | None, device: str,
               batch_size: int, work: Path, key: str, pool=None, progress=None) -> None:
    """Stages 2-3 scores of one slice's survivors, written as its part file."""
    models = models or Models(job.filters, job.inception, device)
    scores = score_slice(items, job, models, pool, batch_size, progress=progress)
    manifest.write_scores(work, k, key, index, scores)


def _ray_map(fn, calls: list[tuple], gpus: float) -> None:
    """Runs fn(*call) for each call as Ray Data tasks; each writes its own part file."""
    from genfoundry.curation.filters import require

    ray = require("ray", "pip install 'ray[data]'", "--ray")
    import logging

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                 logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # genfoundry's own bar counts the images
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = ray.data.from_items([{"call": n} for n in range(len(calls))])
    remote_calls = ray.put(calls)

    def run(row: dict) -> dict:
        fn(*ray.get(remote_calls)[row["call"]])
        return row

    dataset.map(run, num_gpus=gpus or None).materialize()


def _stage1(slices: list[list[Item]], cfg: CurateConfig, work: Path, ex: Executor,
            progress: bool) -> list[list[dict]]:
    rules = dataclasses.asdict(cfg.basic)
    recipes = [recipe("basic", 1, rules, [_identity(i) for i in items]) for items in slices]
    mine = ex.mine(range(len(slices)))
    todo = [k for k in mine if manifest.read_part(work, "basic", k, recipes[k]) is None]
    total = sum(len(slices[k]) for k in mine)
    with bar(total, "curate: basic", initial=total - sum(len(slices[k]) for k in todo), enabled=progress) as shown:
        if ex.ray:
            _ray_map(basic_slice, [(k, slices[k], cfg.basic, work, recipes[k]) for k in todo], 0)
            shown.update(sum(len(slices[k]) for k in todo))
        for k in [] if ex.ray else todo:
            basic_slice(k, slices[k], cfg.basic, work, recipes[k], ex.pool, shown.update)
    ex.barrier()
    parts = []
    for k, items in enumerate(slices):
        rows = manifest.read_part(work, "basic", k, recipes[k])
        if rows is None:
            raise CurateError(f"the stage-1 part of slice {k} is missing after every rank finished; run again")
        parts.append(rows)
    return parts


def _stage23(slices: list[list[Item]], rows: list[list[dict]], cfg: CurateConfig, work: Path, ex: Executor,
             filters: list, device: str, progress: bool) -> list[dict]:
    """Scores of each slice's survivors of stage 1: {'index': positions in the slice, 'failures', scores...}."""
    quality = "quality" in cfg.run.stages
    job = Job(filters, quality)
    names = [f.name for f in filters]
    survivors = [[j for j, r in enumerate(part) if r["decision"] == "keep"] for part in rows]
    recipes = [recipe("deep", 1, names, quality,
                      [[slices[k][j].source, rows[k][j]["sha256"]] for j in survivors[k]]) for k in range(len(slices))]
    batch = min(cfg.semantic.batch_size, cfg.quality.batch_size) if quality and filters else (
        cfg.quality.batch_size if quality else cfg.semantic.batch_size)
    mine = ex.mine(range(len(slices)))
    todo = [k for k in mine if manifest.read_scores(work, k, recipes[k]) is None]
    total = sum(len(survivors[k]) for k in mine)
    calls = [(k, [slices[k][j] for j in survivors[k]], survivors[k], job) for k in todo]
    with bar(total, "curate: semantic + quality", initial=total - sum(len(survivors[k]) for k in todo),
             enabled=progress) as shown:
        if ex.ray and calls:
            _ray_map(deep_slice, [(*c, None, device, batch, work, recipes[c[0]]) for c in calls],
                     1 if device.startswith("cuda") else 0)
            shown.update(sum(len(c[1]) for c in calls))
        elif calls:
            models = Models(filters, quality, device)
            for call in calls:
                deep_slice(*call, models, device, batch, work, recipes[call[0]], ex.pool, shown.update)
    ex.barrier()
    out = []
    for k in range(len(slices)):
        scores = manifest.read_scores(work, k, recipes[k])
        if scores is None:
            raise CurateError(f"the stage-2 part of slice {k} is missing after every rank finished; run again")
        out.append(scores)
    return out


def curate(sources: list[str] | str, out: str, cfg: CurateConfig | None = None, progress: bool = True,
           print_fn=print, ray: bool = False) -> dict:
    """Curates `sources` (folders, .tar files, .csv/.parquet lists) into `out`: manifest.parquet (a row for
    every input, with its decision, reason and scores), kept.parquet (for `genfoundry pack`), summary.json
    and the funnel pictures. Running it again resumes. With `ray`, slices run as Ray Data tasks (on the
    cluster `ray.init()` finds, else a local one). Returns the summary."""
    from genfoundry.accel import get_device
    from genfoundry.curation import filters as registry, decide

    cfg = cfg or CurateConfig()
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    outdir = writable_directory(out, CurateError)
    work = outdir / WORK
    work.mkdir(exist_ok=True)
    manifest.remove_leftovers(outdir)
    listing = list_sources([str(s) for s in sources])
    size = cfg.run.slice_size
    slices = [listing.items[i:i + size] for i in range(0, len(listing.items), size)]
    stages = [s.strip() for s in cfg.run.stages.split(",")]
    ex = Executor(cfg.run.workers, ray, work)
    try:
        device = str(get_device(cfg.run.device))
        if ex.group is not None and device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        filters = []  # built before any work, so that a wrong name or a missing package stops it at once
        if "semantic" in stages:
            thresholds = cfg.semantic.threshold_of
            filters = [registry.build(n, device=device, threshold=thresholds.get(n))
                       for n in cfg.semantic.filter_names]
            unknown = set(thresholds) - {f.name for f in filters} - set(cfg.semantic.filter_names)
            if unknown:
                raise CurateError(f"semantic.thresholds names {', '.join(sorted(unknown))}, which is not among "
                                  f"semantic.filters ({cfg.semantic.filters})")
            if cfg.semantic.dedup and not any(f.embeds and f.name == cfg.semantic.dedup_embedder for f in filters):
                raise CurateError(f"semantic.dedup_embedder '{cfg.semantic.dedup_embedder}' is not an embedding "
                                  f"filter among semantic.filters ({cfg.semantic.filters}); set "
                                  f"semantic.dedup=false or add it")
        clock = time.perf_counter()
        rows = _stage1(slices, cfg, work, ex, progress)
        seconds = {"basic": time.perf_counter() - clock}
        flat = [dict(r, source=display(i.source), item=i) for items, part in zip(slices, rows)
                for i, r in zip(items, part)]
        counts = {"exact": basic.exact_duplicates(flat) if cfg.basic.exact_dedup else 0,
                  "near": basic.near_duplicates(flat, cfg.basic.near_dedup_bits)}
        scores = None
        if len(stages) > 1:
            # Stage 1's dedup decides the survivors; every rank computes it alike from the same parts.
            offset, per_slice = 0, []
            for part in rows:
                per_slice.append(flat[offset:offset + len(part)])
                offset += len(part)
            clock = time.perf_counter()
            scores = _stage23(slices, per_slice, cfg, work, ex, filters, device, progress)
            seconds["semantic+quality"] = time.perf_counter() - clock
        if ex.rank != 0:
            return {}
        clock = time.perf_counter()
        result = decide.finish(flat, listing.unlisted, scores, slices, filters, cfg, device, ex, progress)
        seconds["decisions"] = time.perf_counter() - clock
    finally:
        ex.close()
    summary = manifest.write_outputs(outdir, result, cfg, sources, counts, seconds)
    examples.write(outdir, result["rows"])
    print_fn(manifest.summary_line(summary, outdir))
    return summary
