"""One Python function per CLI command: train, sample, evaluate, demo."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from genfoundry import accel
from genfoundry import config as config_lib
from genfoundry.config import Config, ConfigError
from genfoundry.sampling import generate, grid, rank_batches, save_png
from genfoundry.errors import GenfoundryError, writable_directory
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.models import DiT, DiTArch
from genfoundry.trainer import Trainer, run_dir_of
from genfoundry.trainer.loop import ema_clearly_worse

FORMAT_VERSION = 1


class RunError(GenfoundryError):
    """A run directory that lacks what a command needs, or an output directory that cannot be written."""


def check_names(cfg: Config) -> None:
    """One ConfigError for a config value that names something no registry holds (a model preset, a
    time sampling, a loss weighting), before any work starts; `--dry-run` runs it too."""
    import difflib

    from genfoundry.diffusion.objective import LOSS_WEIGHTINGS, TIME_SAMPLERS
    from genfoundry.models import MODELS

    for key, value, registry in (("model.preset", cfg.model.preset, MODELS),
                                 ("diffusion.time_sampling", cfg.diffusion.time_sampling, TIME_SAMPLERS),
                                 ("diffusion.loss_weighting", cfg.diffusion.loss_weighting, LOSS_WEIGHTINGS)):
        if value not in registry:
            close = difflib.get_close_matches(value, list(registry), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key} '{value}' is not one of {', '.join(sorted(registry))}{hint}")


def train(cfg: Config, print_fn=print, on_report=None) -> dict:
    """Trains or resumes the run `cfg` names; returns the last metrics row. `on_report(step, values)`
    is called after each metrics report (see `Trainer`); what it raises ends the run.

    Under torchrun (WORLD_SIZE > 1) it joins the process group and trains as one rank of many. When
    another rank dies it raises `PeerLostError`; any other error keeps its type and traceback.
    """
    from genfoundry.distributed import parallel

    check_names(cfg)
    joined_before = accel.distributed()
    try:
        result = Trainer(cfg, print_fn, on_report=on_report).train()
        parallel.mark_finished()
        return result
    except RuntimeError as e:  # told apart while the process group and its heartbeat still exist
        why = parallel.peer_failure(e)
        if why is None:
            raise
        raise parallel.PeerLostError(why) from e
    finally:
        if not joined_before:
            parallel.destroy_process_group()


def weights_dir(run_dir: str | Path, snapshot: int | str | None = None, checksums: bool = False) -> Path:
    """Where a run's weights to sample are: RUN/final, or with `snapshot` (a step, or "latest") the EMA
    snapshot RUN/checkpoints/snapshot-NNNNNNNNN that training wrote, checked against its manifest
    (file sizes; with `checksums`, as `load_trained` asks once, their SHA-256 too)."""
    if snapshot is None:
        return Path(run_dir) / "final"
    from genfoundry.checkpoint.manifest import CheckpointError, checkpoint_name, parse_name, verify

    root = Path(run_dir) / "checkpoints"
    parsed = [parse_name(p.name) for p in root.iterdir()] if root.is_dir() else []
    steps = sorted(step for kind, step in filter(None, parsed) if kind == "snapshot")
    if snapshot == "latest":
        if not steps:
            raise RunError(f"'{run_dir}' has no snapshots (checkpoint.snapshot_every writes them)")
        snapshot = steps[-1]
    path = root / checkpoint_name("snapshot", int(snapshot))
    if not path.is_dir():
        raise RunError(f"'{run_dir}' has no snapshot of step {snapshot}; it has {steps or 'none'}")
    try:
        verify(path, checksums)
    except CheckpointError as e:
        raise RunError(f"the snapshot cannot be used: {e}") from None
    return path


def final_meta(run_dir: str | Path, snapshot: int | str | None = None) -> dict:
    """RUN/final/model.json (or a snapshot's): the architecture, class names, step and, for the final
    weights, the final validation losses."""
    meta_path = weights_dir(run_dir, snapshot) / "model.json"
    if not meta_path.is_file():
        raise RunError(f"'{run_dir}' has no final model ({meta_path} is missing); train it to the end first, "
                       f"or sample a snapshot (--snapshot latest)")
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {meta_path}: {getattr(e, 'strerror', None) or e}") from None


def load_trained(run_dir: str | Path, weights: str = "auto", device: str = "auto",
                 print_fn=print, snapshot: int | str | None = None) -> tuple[DiT, dict]:
    """The final network of a finished run and its metadata (class names, source, step, final
    validation losses); meta["weights"] names the weights loaded.

    'auto' takes the raw weights ('model') where the EMA's final validation loss is clearly worse
    (`trainer.loop.ema_clearly_worse`: over 1.1x theirs), else the EMA, and prints which and why: after
    a short run the EMA can still hold the early weights."""
    if weights not in ("auto", "ema", "model"):
        raise RunError(f"weights must be 'auto', 'ema' or 'model', got '{weights}'")
    final, meta = weights_dir(run_dir, snapshot, checksums=True), final_meta(run_dir, snapshot)
    if weights == "auto" and snapshot is not None:
        weights = "ema"  # a snapshot holds the EMA only
    elif weights == "auto":
        ema_loss, raw_loss = meta.get("val_loss_ema"), meta.get("val_loss")  # None: not recorded or not finite
        weights = "model" if ema_clearly_worse(raw_loss, ema_loss) else "ema"
        shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in (("model", raw_loss), ("ema", ema_loss))}
        print_fn(f"weights auto: {weights} (final validation loss: model {shown['model']}, ema {shown['ema']}); "
                 f"--weights ema|model chooses")
    weights_path = final / f"{weights}.safetensors"
    if not weights_path.is_file():
        raise RunError(f"'{run_dir}' has no {weights} weights ({weights_path} is missing)")
    meta["weights"] = weights
    model = DiT(DiTArch(**meta["arch"]))
    try:
        state = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or e
        raise RunError(f"{weights_path} is not a readable safetensors file: {reason}") from None
    model.load_state_dict(state)
    model.folded_guidance = meta.get("folded_guidance")  # a guidance-distilled student's (trainer.distill)
    return model.to(accel.get_device(device)).eval(), meta


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise RunError(f"'{run_dir}' is not a run directory ({path} is missing)")
    return config_lib.load(str(path))


def balanced_labels(num_images: int, num_classes: int, classes: list[int] | None = None) -> torch.Tensor:
    """Labels that cycle through `classes` (default: all `num_classes`), so each gets its share."""
    pool = torch.tensor(classes) if classes else torch.arange(num_classes)
    return pool[torch.arange(num_images) % len(pool)]


SOLVER_KEYS = ("sampler", "steps", "schedule", "shift", "cfg_scale", "guidance_schedule", "seed", "batch_size",
               "precision", "compile")


def sampling_config(sc: config_lib.SampleConfig, **given) -> config_lib.SampleConfig:
    """The run's [sample] section with the given settings (None: the run's) in place, checked as the
    config checks them."""
    unknown = set(given) - set(SOLVER_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling settings {sorted(unknown)}")
    return dataclasses.replace(sc, **{k: v for k, v in given.items() if v is not None})


def _portable(error: Exception) -> Exception:
    """`error` as another rank can receive it: itself where it pickles, else a RuntimeError saying it."""
    import pickle

    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


@contextlib.contextmanager
def joined(device: str):
    """Under torchrun (WORLD_SIZE > 1), this command's ranks in one process group, left at the end (one
    made by the caller stays the caller's); alone, nothing. Yields this rank's device."""
    from genfoundry.distributed import parallel

    dev = accel.get_device(device)
    joined_before = accel.distributed()
    parallel.init_process_group(dev, 600)
    try:
        yield dev
    finally:
        if not joined_before:
            parallel.destroy_process_group()


def sample(run_dir: str | Path, out_dir: str | Path | None = None, num_images: int | None = None,
           sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
           seed: int | None = None, batch_size: int | None = None, weights: str = "auto",
           device: str = "auto", write_images: bool = True, classes: list[str] | None = None,
           print_fn=print, snapshot: int | str | None = None, **solver) -> dict:
    """Writes a grid (one row per class) and, optionally, every image as a PNG; settings default to the
    run's. `classes` names the classes to sample, as in the run's class list (default: all);
    `snapshot` (a step, or "latest") samples an EMA snapshot written during training instead. `solver`
    may set any other key of SOLVER_KEYS (schedule, shift, guidance_schedule, precision, compile).

    Under torchrun the ranks share the images by global index (genfoundry.sampling.rank_batches): each
    writes its own PNGs, rank 0 the grid and sampling.json, and the images are the same as alone."""
    for flag, value in (("--num-images", num_images), ("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    sc = sampling_config(run_config(run_dir).sample, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                         batch_size=batch_size, **solver)
    before = final_meta(run_dir, snapshot)
    snapshot = snapshot if snapshot is None else before["step"]  # "latest" resolved once
    names = before["class_names"]
    unknown = [c for c in classes or [] if c not in names]
    if unknown:
        raise ConfigError(f"--class {', '.join(repr(c) for c in unknown)}: not a class of this run, whose classes "
                          f"are {', '.join(names)}")
    with joined(device) as dev:
        main = accel.is_main_process()
        model, meta = load_trained(run_dir, weights, str(dev), print_fn if main else lambda *a: None, snapshot)
        chosen = [names.index(c) for c in classes] if classes else list(range(len(names)))
        k = len(chosen)
        num_images = sc.per_class * k if num_images is None else num_images
        default = "sampled" if snapshot is None else f"sampled-{meta['step']:09d}"
        out = writable_directory(out_dir or Path(run_dir) / "samples" / default, RunError)
        labels = balanced_labels(num_images, len(names), chosen)
        settings = sc.solver_settings()
        t0 = time.perf_counter()
        images = generate(model, labels, range(num_images), shared=True, progress=main, **settings)
        sampling_s = time.perf_counter() - t0
        if main:  # order by class, in the order given, so that each grid row is one class
            order = torch.argsort(torch.arange(num_images) % k, stable=True)
            save_png(grid(images[order], rows=min(k, num_images)), out / "grid.png")
        if write_images:
            for positions in rank_batches(num_images, sc.batch_size):
                for i in positions:
                    save_png(images[i], out / f"{i:06d}-{names[labels[i]]}.png")
        info = {"format_version": FORMAT_VERSION, "run": str(run_dir), "num_images": num_images,
                "weights": meta["weights"], "step": meta["step"], "classes": [names[c] for c in chosen], **settings,
                "ranks": accel.world_size(), "sampling_s": sampling_s, "out_dir": str(out)}
        if main:
            write_atomic(out / "sampling.json", json.dumps(info, indent=2).encode())
        if accel.distributed():
            torch.distributed.barrier()  # every rank's PNGs are written when any rank returns
    return info


def evaluate(run_dir: str | Path, num_samples: int | None = None, reference: str | None = None,
             split: str | None = None, device: str = "auto", print_fn=print, resize: str | None = None,
             max_reference_images: int | None = None, weights: str = "auto",
             snapshot: int | str | None = None, **solver) -> dict:
    """FID and KID of `num_samples` class-balanced samples from a finished run against a reference set
    (a dataset name, image folder or shard set; default the training source) built at the run's image
    size and channels. The reference statistics are made, or found, before any sample is generated.
    `snapshot` (a step, or "latest") scores an EMA snapshot written during training instead; `solver`
    may set any key of SOLVER_KEYS (default: the run's [sample] settings).

    Under torchrun the ranks share the samples by global index and rank 0 scores them: the FID is the
    same as alone. Every rank returns the result."""
    from genfoundry.eval import evaluate as score
    from genfoundry.eval import reference_stats

    if num_samples is not None and num_samples < 2:
        raise ConfigError(f"--num-samples must be at least 2 (FID needs a covariance), got {num_samples}")
    if max_reference_images is not None and max_reference_images < 1:
        raise ConfigError(f"--max-reference-images must be at least 1, got {max_reference_images}")
    cfg = run_config(run_dir)
    ec, sc = cfg.eval, sampling_config(cfg.sample, **solver)
    num_samples = ec.num_samples if num_samples is None else num_samples
    resize = resize or ec.resize
    snapshot = snapshot if snapshot is None else final_meta(run_dir, snapshot)["step"]  # "latest" resolved once
    with joined(device) as dev:
        main = accel.is_main_process()
        model, meta = load_trained(run_dir, weights, str(dev), print_fn if main else lambda *a: None, snapshot)
        out = writable_directory(Path(run_dir) / "eval", RunError)
        t0 = time.perf_counter()
        # Every rank finds (or builds) the statistics: no rank waits in a collective while rank 0 reads a
        # large reference alone, and a reference that cannot serve is the same error on every rank.
        ref = reference_stats(reference or ec.reference or cfg.data.source, split or ec.split,
                              meta["arch"]["image_size"], meta["arch"]["in_channels"], resize, str(dev),
                              max_images=ec.max_reference_images if max_reference_images is None
                              else max_reference_images, progress=main)
        reference_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        settings = sc.solver_settings()
        images = generate(model, balanced_labels(num_samples, len(meta["class_names"])), range(num_samples),
                          shared=True, progress=main, **settings)
        sampling_s = time.perf_counter() - t0
        result = failure = None
        if main:
            try:
                t0 = time.perf_counter()
                result = score(images.numpy(), device=str(dev), kid_subset_size=ec.kid_subset_size,
                               reference_stats_=ref, resize=resize)
                result.update(reference_s=reference_s, sampling_s=sampling_s, scoring_s=time.perf_counter() - t0,
                              sampler=sc.sampler, sampler_steps=sc.steps, cfg_scale=sc.cfg_scale, schedule=sc.schedule,
                              shift=sc.shift, guidance_schedule=sc.guidance_schedule, precision=sc.precision,
                              guidance_interval=[sc.guidance_min_t, sc.guidance_max_t], ranks=accel.world_size(),
                              run=str(run_dir), step=meta["step"], weights=meta["weights"])
                name = (f"fid-{num_samples}.json" if snapshot is None
                        else f"fid-{num_samples}-step{meta['step']:09d}.json")
                write_atomic(out / name, json.dumps(result, indent=2).encode())
                record_fid(Path(run_dir), cfg, result)
                identity = result["reference_identity"]
                print_fn(f"FID {result['fid']:.3f}  ({result['num_generated']} generated vs "
                         f"{result['num_reference']} reference images of {result['reference']}; "
                         f"{identity['resolution']}x"
                         f"{identity['resolution']}x{identity['channels']}, resize {resize}, network "
                         f"{identity['network_sha256']})")
            except Exception as e:  # the other ranks wait in the broadcast below: they raise it too
                failure = e
        if accel.distributed():
            box = [result if failure is None else _portable(failure)]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
        if failure is not None:
            raise failure
        if isinstance(result, Exception):  # rank 0's error, on the other ranks
            raise result
    return result


def build_report(run_dirs: list[str | Path] | str | Path, out: str | Path | None = None,
                 curation: str | Path | None = None) -> Path:
    """One self-contained report.html of runs and, optionally, a curation (`genfoundry.report`)."""
    from genfoundry.report import build_report as build

    return build(run_dirs, out, curation)


def record_fid(run_dir: Path, cfg: Config, result: dict) -> None:
    """An 'eval' event in metrics.jsonl and an eval/fid scalar in TensorBoard, at the weights' step."""
    from genfoundry import metrics

    values = {k: result[k] for k in ("fid", "kid_mean", "num_generated", "weights")}
    if (run_dir / "metrics.jsonl").exists():
        metrics.JsonlSink(run_dir / "metrics.jsonl").event("eval", result["step"], values)
    if cfg.train.tensorboard:
        try:
            sink = metrics.TensorBoardSink(run_dir)
        except ImportError:
            return
        sink.write(result["step"], {f"eval/{k}": v for k, v in values.items()})
        sink.close()


def demo(overrides: dict | None = None, print_fn=print) -> dict:
    """MNIST end to end on whatever this machine has: train, sample grids, FID."""
    cfg = config_lib.load("demo", overrides)
    t0 = time.perf_counter()
    train(cfg, print_fn)
    train_s = time.perf_counter() - t0
    result = evaluate(run_dir_of(cfg), print_fn=print_fn)
    summary = {"format_version": FORMAT_VERSION, "wall_s": time.perf_counter() - t0, "train_s": train_s,
               "fid": result["fid"], "kid_mean": result["kid_mean"], "num_generated": result["num_generated"],
               "reference": result["reference"], "run": str(run_dir_of(cfg))}
    write_atomic(run_dir_of(cfg) / "demo.json", json.dumps(summary, indent=2).encode())
    try:
        report = build_report(run_dir_of(cfg))  # again, now with the FID
    except GenfoundryError as e:  # the run and its FID stand; the page is a view of them
        print_fn(f"warning: no report.html: {e}")
        report = None
    print_fn(f"demo finished in {summary['wall_s']:.0f} s: FID {summary['fid']:.2f} on {summary['num_generated']} "
             f"samples vs {summary['reference']}; grids in {run_dir_of(cfg) / 'samples'}")
    if report:
        print_fn(f"report: {report} (open it in a browser; it works offline)")
    return summary
