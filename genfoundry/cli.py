"""Command line: parses arguments, resolves the config, calls one library function per command."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import shutil
import sys
import textwrap

from genfoundry import config as config_lib
from genfoundry.errors import GenfoundryError

OVERRIDE_HELP = ("config overrides as --section.key=value (e.g. --train.lr=3e-4 --run.name=exp1); "
                 "sections: run, data, model, diffusion, train, parallel, sample, eval")


class _KeysTableFormatter(argparse.HelpFormatter):
    """Wraps descriptions as argparse does, and prints text that holds line breaks (the table of
    config keys in the epilog) as it is written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _config_epilog() -> str:
    """The override syntax and every config key with its default and description (from config.py)."""
    width = max(80, min(120, shutil.get_terminal_size().columns)) - 2  # as argparse sizes its help
    keys = ("config keys and their defaults (a recipe sets some of them; --dry-run prints the resolved "
            "config):")
    return f"{textwrap.fill(OVERRIDE_HELP, width)}\n\n{textwrap.fill(keys, width)}\n{config_lib.keys_help(width)}"


def _curate_epilog() -> str:
    from genfoundry.curation.config import CurateConfig
    from genfoundry.curation.filters import builtin_help

    width = max(80, min(120, shutil.get_terminal_size().columns)) - 2
    overrides = ("config overrides as --section.key=value (e.g. --basic.min_side=256 --semantic.thresholds=ocr=0.3 "
                 "--run.stages=basic); sections: run, basic, semantic, quality")
    return (f"{textwrap.fill(overrides, width)}\n\nsemantic filters (semantic.filters; a threshold by "
            f"semantic.thresholds=name=value):\n{builtin_help()}\n\nconfig keys and their defaults:\n"
            f"{config_lib.keys_help(width, CurateConfig)}")


def _tune_epilog() -> str:
    """The search-space syntax, then the config keys that can be searched or fixed."""
    width = max(80, min(120, shutil.get_terminal_size().columns)) - 2
    spec = ("search space, one --search KEY=SPEC per key (or a --space file's [search] table):\n"
            "  log:LO:HI            log-uniform in [LO, HI], LO > 0 (integers where the key is one)\n"
            "  LO:HI[:STEP]         uniform in [LO, HI] (integers where the key is one)\n"
            "  float:LO:HI[:STEP]   the same, said outright\n"
            "  int:LO:HI[:STEP]     integers in [LO, HI]\n"
            "  choice:A,B,...       one of the values (text, numbers, true,false)\n")
    fixed = ("Further --section.key=value arguments fix a key for every trial (e.g. --train.steps=300 "
             "--train.val_every=50 for short trials). Unknown keys and values the config rejects (a range's "
             "ends, every choice) are one error before any trial runs.")
    return f"{spec}\n{textwrap.fill(fixed, width)}\n\n{_config_epilog()}"


def _config_args(p: argparse.ArgumentParser, default_recipe: str | None) -> None:
    p.add_argument("--config", default=default_recipe, metavar="RECIPE",
                   help=f"a recipe name shipped with genfoundry or a .toml path (default: {default_recipe or 'none'})")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _snapshot(value: str) -> int | str:
    if value == "latest":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a step or 'latest', got '{value}'") from None


def _solver_args(p: argparse.ArgumentParser) -> None:
    """The sampling settings `sample` and `eval` take (default: the run's [sample] section)."""
    from genfoundry.sampling.solvers import GUIDANCE_SCHEDULES, SCHEDULES, SOLVERS

    g = p.add_argument_group("sampling (default: the run's [sample] settings)")
    g.add_argument("--sampler", choices=list(SOLVERS), help="ODE solver: " + "; ".join(
        f"{name}: {solver.about}" for name, solver in SOLVERS.items()))
    g.add_argument("--steps", type=int, help="solver steps (heun spends 2 network evaluations per step but the last)")
    g.add_argument("--schedule", choices=list(SCHEDULES),
                   help="time grid: uniform in t, shifted (--shift), EDM's karras grid, or even in log-SNR")
    g.add_argument("--shift", type=float, help="s of the shift grid, t' = s t / (1 + (s - 1) t); 0 takes "
                                               "sqrt(values per image / 4096)")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance weight; 1 disables")
    g.add_argument("--guidance-schedule", choices=list(GUIDANCE_SCHEDULES),
                   help="how the guidance weight varies with t, with the same mean: constant, linear "
                        "(none at noise, most at the data), cosine")
    g.add_argument("--precision", choices=list(config_lib.SAMPLE_PRECISIONS),
                   help="network precision; auto: bf16 on a CUDA GPU that has it, else fp32; fp8: float8 matrix "
                        "products in the transformer blocks (GPUs of compute capability 8.9 and later)")
    g.add_argument("--compile", choices=list(config_lib.SAMPLE_COMPILE),
                   help="auto: CUDA graphs of the compiled network on CUDA, compiled on other accelerators, "
                        "eager on a CPU")
    g.add_argument("--batch-size", type=int, help="images per network call; does not change the images")


def _solver_values(args) -> dict:
    return {k: getattr(args, k) for k in ("sampler", "steps", "schedule", "shift", "cfg_scale", "guidance_schedule",
                                          "precision", "compile", "batch_size")}


def _snapshot_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", type=_snapshot, metavar="STEP|latest",
                   help="use the EMA snapshot training wrote at STEP (checkpoint.snapshot_every), or the newest, "
                        "instead of the final weights; the run need not have finished")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genfoundry",
        description="Image generation end to end: train a DiT with flow matching, sample, score FID.",
        epilog="Run `genfoundry COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="train on MNIST, write sample grids and FID (a few minutes on a CPU)",
                       description="Trains the shipped 'demo' recipe on MNIST, writes sample grids during and "
                                   "after training, scores FID/KID, and writes runs/demo/.",
                       epilog=_config_epilog(), formatter_class=_KeysTableFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("train", help="train or resume a run (running the same command again resumes)",
                       description="Trains the run the config describes; a run directory that already holds "
                                   "checkpoints is resumed exactly (on another number of ranks, to "
                                   "floating-point tolerance). Under torchrun "
                                   "(torchrun --nproc-per-node=N -m genfoundry train ...) every rank trains its "
                                   "share of each global batch.",
                       epilog=_config_epilog(), formatter_class=_KeysTableFormatter)
    _config_args(p, "mnist")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N processes on this machine through torchrun (default: 1, or as torchrun set)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="through torchrun, restart all processes when one fails, up to K times; each restart "
                        "resumes from the last checkpoint (default: 0)")

    p = sub.add_parser("pack", help="pack images into indexed, checksummed WebDataset-layout tar shards",
                       description="Packs SRC (an image folder, a .csv/.parquet list with a 'path' column, or "
                                   "mnist[:split] / fashion-mnist[:split]) into OUT. Running it again resumes: "
                                   "finished shards are not redone. Inputs that fail to decode are listed in "
                                   "OUT/failures.jsonl and left out.")
    p.add_argument("src", help="image folder, .csv/.parquet list, or mnist[:split] / fashion-mnist[:split]")
    p.add_argument("out", help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="default: 1000")
    p.add_argument("--resolution", type=int, help="centre-crop and resize to this side and re-encode "
                                                  "(default: keep the original bytes)")
    p.add_argument("--format", dest="image_format", choices=["keep", "jpeg", "png"], default="keep",
                   help="re-encode as JPEG or lossless PNG (default: keep; PNG for images of 64 px or less)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (default: 90)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")

    p = sub.add_parser("curate", help="clean raw images in three levels, with a row and a reason for every input",
                       description="Curates SRC (image folders, searched recursively; .tar files; .csv/.parquet "
                                   "lists with a 'path' column) into OUT: manifest.parquet (one row per input: "
                                   "facts, decision, reason, every score), kept.parquet (which `genfoundry pack` "
                                   "takes), summary.json, funnel.svg and reasons.svg. Stage 1 (basic) checks the "
                                   "header, the rules and a full decode and drops exact and near duplicates; "
                                   "stage 2 (semantic) runs pretrained filters and semantic dedup; stage 3 "
                                   "(quality) keeps the images closest to a reference in TF-Inception features. "
                                   "Running it again resumes, and changing only a threshold redoes no model work. "
                                   "Under torchrun (or --nproc N) each rank takes its share of the slices.",
                       epilog=_curate_epilog(), formatter_class=_KeysTableFormatter)
    p.add_argument("src", nargs="+", help="image folders, .tar files or .csv/.parquet lists")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", metavar="TOML", help="a .toml file of [run], [basic], [semantic] and [quality] keys")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N processes on this machine through torchrun, each curating its share")
    p.add_argument("--ray", action="store_true", help="run the slices as Ray tasks (needs `pip install ray`)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("sample", help="write a sample grid and PNG images from a finished run",
                       description="Samples a finished run. Under torchrun (torchrun --nproc-per-node=N -m "
                                   "genfoundry sample ...) the ranks share the images by global index; the images "
                                   "are the same whatever the number of ranks.")
    p.add_argument("run_dir", help="a run directory (e.g. runs/demo)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/samples/sampled)")
    p.add_argument("--num-images", type=int, help="images to generate, class-balanced (default: a grid of per_class per class)")
    _solver_args(p)
    p.add_argument("--seed", type=int, help="base seed; image i uses noise seeded by (seed, i)")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="sample only this class, named as in the run's class list (RUN_DIR/final/model.json); "
                        "repeatable (default: every class)")
    p.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                   help="EMA or raw weights; auto takes the raw ones where the EMA's final validation loss "
                        "is over 1.1x theirs, else the EMA, and says which (default: auto)")
    _snapshot_arg(p)
    p.add_argument("--grid-only", action="store_true", help="write only the grid, not every image")
    p.add_argument("--device", default="auto", help="device, e.g. cpu or cuda:0 (default: auto)")

    p = sub.add_parser("eval", help="FID and KID of a finished run's samples against a reference set",
                       description="Scores class-balanced samples of a finished run against reference statistics "
                                   "built, like the samples, at the run's image size and channels (decoded as "
                                   "training decodes them), then resized to 299 px by one convention. The "
                                   "statistics are found or computed (and cached) before any sample is made.")
    p.add_argument("run_dir", help="a run directory (e.g. runs/demo)")
    p.add_argument("--num-samples", type=int, help="generated images to score (default: the run's eval.num_samples)")
    p.add_argument("--reference", help="mnist, fashion-mnist, an image folder or a packed shard set "
                                       "(default: the run's eval.reference, else its training source)")
    p.add_argument("--split", help="reference split of a named dataset (default: the run's eval.split, train)")
    p.add_argument("--resize", choices=config_lib.EvalConfig.RESIZE_CONVENTIONS,
                   help="how images reach 299 px: pil-bicubic-uint8 (PIL bicubic on uint8 images) or clean "
                        "(PIL bicubic per channel in float32, not rounded) (default: the run's eval.resize)")
    p.add_argument("--max-reference-images", type=int, metavar="N",
                   help="use only the first N reference images (default: the run's eval.max_reference_images, "
                        "0 meaning all)")
    p.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                   help="EMA or raw weights; auto chooses as sample does (default: auto)")
    _snapshot_arg(p)
    _solver_args(p)
    p.add_argument("--device", default="auto", help="device, e.g. cpu or cuda:0 (default: auto)")
    p = sub.add_parser("report", help="one self-contained report.html of runs (and a curation): every metric, "
                                      "the timeline and goodput, sample grids, FID, config",
                       description="Writes one page that opens offline (data and charts embedded): every metric "
                                   "of metrics.jsonl against step or wall time, with zoom and smoothing; the "
                                   "timeline of checkpoints, restarts and rollbacks with goodput; sample grids over "
                                   "training on a slider; FID over steps; the resolved config. Several runs share "
                                   "the charts. --curation adds a curation's funnel, counts per reason, score "
                                   "histograms with their thresholds and thumbnails of dropped inputs. Training "
                                   "rebuilds RUN/report.html every train.report_every steps.")
    p.add_argument("run_dir", nargs="*", help="run directories (e.g. runs/demo runs/other)")
    p.add_argument("--curation", metavar="DIR", help="a `genfoundry curate` output directory")
    p.add_argument("--out", metavar="FILE", help="where to write the page (default: RUN_DIR/report.html for one "
                                                 "run, else ./report.html)")

    p = sub.add_parser("tune", help="hyper-parameter search over any config keys (Optuna): short trials, pruning, "
                                    "a study that resumes and can be shared by several processes",
                       description="Trains up to --trials short runs of the recipe, each with values of the searched "
                                   "keys that Optuna's TPE sampler picks, as RUN_ROOT/STUDY/trial-NNNN, and scores "
                                   "each by its final validation loss (or FID). At every validation a trial that "
                                   "falls behind the others is stopped early (pruned). The study lives in a database "
                                   "(default SQLite at RUN_ROOT/STUDY/study.db): running the same command again "
                                   "runs only the trials still missing, and processes or machines given the same "
                                   "--storage share the study. A trial whose process died is taken over once its "
                                   "heartbeat is 2 x --heartbeat-s old and resumes from its run directory's newest "
                                   "checkpoint. After every trial RUN_ROOT/STUDY/ holds trials.json, best.toml (the "
                                   "best trial's config as a recipe) and report.html.",
                       epilog=_tune_epilog(), formatter_class=_KeysTableFormatter)
    p.add_argument("--study", default="tune", metavar="NAME",
                   help="the study's name and directory under run.root (default: tune)")
    p.add_argument("--trials", type=int, default=20, metavar="N",
                   help="complete or pruned trials the study needs, counted over every process sharing it "
                        "(default: 20)")
    p.add_argument("--search", action="append", metavar="KEY=SPEC",
                   help="a key to search, repeatable: train.lr=log:1e-4:3e-3, train.warmup_steps=int:0:500, "
                        "train.ema_halflife_kimg=0.5:20, diffusion.time_sampling=choice:uniform,logit-normal")
    p.add_argument("--space", metavar="FILE.toml",
                   help="a TOML file with a [search] table of KEY = SPEC (and optional [[enqueue]] trials); "
                        "--search wins for a key in both")
    p.add_argument("--config", default="demo", metavar="RECIPE",
                   help="the base recipe: a name shipped with genfoundry or a .toml path (default: demo)")
    p.add_argument("--metric", choices=["val_loss", "val_loss_ema", "fid"], default="val_loss",
                   help="what a trial is scored by, lower being better: val_loss, the lower of the raw and EMA "
                        "weights' final validation losses; val_loss_ema, the EMA's; fid, the FID of the finished "
                        "trial (default: val_loss)")
    p.add_argument("--fid-samples", type=int, metavar="N",
                   help="--metric fid: samples to score (default: the recipe's eval.num_samples)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="how hopeless trials are stopped at a validation: median (worse than the median of the "
                        "finished trials at that step), hyperband (successive halving), none (default: median)")
    p.add_argument("--prune-startup-trials", type=int, default=5, metavar="K",
                   help="median: trials that finish before any is pruned (default: 5)")
    p.add_argument("--prune-warmup-steps", type=int, default=0, metavar="S",
                   help="no trial is pruned before step S (default: 0, any validation after step 0)")
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna storage URL, e.g. sqlite:///path/study.db or postgresql://host/db (default: "
                        "sqlite at RUN_ROOT/STUDY/study.db)")
    p.add_argument("--heartbeat-s", type=int, default=30, metavar="S",
                   help="seconds between a running trial's heartbeats; one silent for 2 x S is taken as dead, "
                        "failed, and run again from its checkpoint (default: 30)")
    p.add_argument("--enqueue", action="append", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="a trial to run before any sampled one (e.g. the recipe's own values), repeatable; keys "
                        "left out are sampled; a trial already in the study is not queued again")
    p.add_argument("--sampler-seed", type=int, metavar="SEED",
                   help="seed of the TPE sampler (default: none; give each process of a shared study its own)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the search space and overrides, print the base config and the space, and exit")

    p = sub.add_parser("chaos", help="kill ranks of a small multi-process run with kill -9 and check that the "
                                     "restarted run ends bit-exact",
                       description="Runs N trials of a small run of RECIPE on R ranks (CPU, gloo) under torchrun. "
                                   "Each trial kills ranks with SIGKILL, once in the middle of a checkpoint write "
                                   "and then at random steps, lets torchrun restart them, and compares the final "
                                   "weights with the same run without faults. The last line printed is "
                                   "'bit-exact K/N'; the exit status is 0 when every trial is.",
                       epilog="Further --section.key=value arguments override the small run's config (after "
                              "genfoundry chaos's own settings).")
    p.add_argument("--config", default="demo", metavar="RECIPE", help="recipe (default: demo)")
    p.add_argument("--trials", type=int, default=3, metavar="N", help="default: 3")
    p.add_argument("--ranks", type=int, default=2, metavar="R", help="processes per run (default: 2)")
    p.add_argument("--steps", type=int, default=12, metavar="S", help="training steps per run (default: 12)")
    p.add_argument("--faults", type=int, default=2, metavar="F",
                   help="kills per trial, the first one inside a checkpoint write (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="trial i draws its faults from seed + i (default: 0)")
    p.add_argument("--max-restarts", type=int, metavar="K", help="torchrun's restarts per trial (default: F + 1)")
    p.add_argument("--trial-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a run still going after this long is killed and counted as not completed (default: 600)")
    p.add_argument("--workdir", help="where the runs and their logs go, kept (default: a new temporary "
                                     "directory, removed afterwards)")
    p.add_argument("--out", help="write the results as JSON here")

    p = sub.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    b = bench.add_parser("train", help="images/s and MFU of the trainer's own step on random latents, against a "
                                       "plain PyTorch loop doing the same work (under torchrun: every rank, DDP)")
    b.add_argument("--preset", action="append", help="model preset, repeatable (default: DiT-B/2)")
    b.add_argument("--batch-size", type=int, action="append",
                   help="images per step per rank, repeatable (default: 256)")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], action="append",
                   help="repeatable (default: bf16)")
    b.add_argument("--compile", choices=["blocks", "loss", "none"], action="append",
                   help="repeatable: parallel.compile with compile_scope blocks or loss, or eager; the plain "
                        "loop compiles its whole model for either (default: blocks)")
    b.add_argument("--cuda-graphs", action="store_true",
                   help="compiled runs also replay as CUDA graphs (parallel.cuda_graphs; needs --compile loss "
                        "for the trainer)")
    b.add_argument("--image-size", type=int, default=32, help="input side (default: 32)")
    b.add_argument("--channels", type=int, default=4, help="input channels (default: 4, a latent's)")
    b.add_argument("--classes", type=int, default=1000, help="classes (default: 1000)")
    b.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop")
    b.add_argument("--profile", action="store_true", help="also print device time per kind of kernel (CUDA)")
    b.add_argument("--steps", type=int, default=30, help="timed steps after warm-up (default: 30)")
    b.add_argument("--out", help="write the results as JSON here")
    b.add_argument("--device", default="auto", help="device (default: auto)")
    b = bench.add_parser("data", help="DataPipeline images/s against torchvision's DataLoader on the same JPEGs")
    b.add_argument("--workers", type=int, default=2, help="worker processes for both (default: 2)")
    b.add_argument("--batch-size", type=int, default=64, help="default: 64")
    b.add_argument("--images", type=int, default=2000, help="JPEGs to generate (default: 2000)")
    b.add_argument("--seconds", type=float, default=30.0, help="timed seconds per loader (default: 30)")
    b.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                   help="JPEG size (default: 500 375)")
    b.add_argument("--crop", type=int, default=256, help="RandomResizedCrop output side (default: 256)")
    b.add_argument("--decode", choices=["auto", "cpu", "gpu", "gpu-main"], default="auto",
                   help="where JPEGs are decoded: cpu (simplejpeg in the workers), gpu (nvJPEG in the "
                        "workers, each a process with its own decoder), gpu-main (nvJPEG in the main process, "
                        "one batch at a time); default auto, gpu where torchvision can")
    b.add_argument("--fast-jpeg", action="store_true",
                   help="CPU decode with libjpeg-turbo's fast chroma upsampling (about 41 dB PSNR against the "
                        "accurate decode; the baseline keeps Pillow's accurate decode)")
    b.add_argument("--baseline-python", help="a Python with torchvision for the baseline (default: none)")
    b.add_argument("--profile", action="store_true", help="print where the main process spends its time")
    b.add_argument("--workdir", help="where the JPEGs and shards go (default: a new temporary directory)")
    b.add_argument("--out", help="write the results as JSON here")
    b.add_argument("--device", default="cpu", help="device for the batch transforms (default: cpu)")
    b = bench.add_parser("compression", help="gradient compression: bytes per step, speed and validation loss of "
                                             "the same run with none, topk and powersgd",
                         description="Trains the same recipe and seed on N ranks once per method, and compares "
                                     "bytes on the wire, images/s and the fixed-noise validation loss.",
                         epilog="Further --section.key=value arguments override the recipe for every run.")
    b.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    b.add_argument("--config", default="mnist", metavar="RECIPE", help="recipe (default: mnist)")
    b.add_argument("--method", action="append", choices=["none", "topk", "powersgd"],
                   help="repeatable (default: all three)")
    b.add_argument("--workdir", help="where the runs go (default: a new temporary directory)")
    b.add_argument("--out", help="write the results as JSON here")
    bench.add_parser("curate", add_help=False,
                     help="curation: stage-1 images/s per core, stages 2-3 images/s on the accelerator, and the "
                          "quality stage on MNIST with injected corruptions (its own options: --help)")
    bench.add_parser("convergence", add_help=False,
                     help="time to FID: a genfoundry recipe and diffusers' DDPM recipe trained for a wall-clock "
                          "budget on Fashion-MNIST, FID at marks (`genfoundry bench convergence --help`)")
    bench.add_parser("sample", add_help=False,
                     help="sampling: network passes/s and images/s for DiT-B/2 and DiT-XL/2 against diffusers' DiT "
                          "pipeline, and FID per solver and NFE (`genfoundry bench sample --help`)")
    bench.add_parser("report", add_help=False,
                     help="time to build report.html and to draw it in headless Chromium for 1k-100k logged steps, "
                          "and its size, against TensorBoard loading the same run (its own options: --help)")
    bench.add_parser("checkpoint", add_help=False,
                     help="training stall and time until durable per checkpoint: torch.save, DCP async_save and "
                          "genfoundry's tiers (`genfoundry bench checkpoint --help` for its options)")
    b = bench.add_parser("comm", help="all-reduce timings (flat, NCCL ring/tree, 2D torus), the fitted alpha-beta "
                                      "model, its choices and a simulation for 8 to 4,096 ranks",
                         description="Starts N ranks through torchrun and runs genfoundry.bench.comm on them "
                                     "(`torchrun --nproc-per-node=N -m genfoundry.bench.comm --help` for all "
                                     "options).")
    b.add_argument("--nproc", type=int, default=4, help="ranks (default: 4)")
    b.add_argument("--sizes", type=int, nargs="+", help="message sizes in bytes (default: 4 KiB ... 256 MiB)")
    b.add_argument("--iters", type=int, default=20, help="timed calls per algorithm and size (default: 20)")
    b.add_argument("--out", help="write the results as JSON here")
    return parser


def launch_torchrun(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Re-runs this command under torchrun with `nproc` processes on this machine."""
    from genfoundry.distributed.launch import RESTART_ENV, torchrun_command

    ours = ("--nproc", "--max-restarts")
    args = [a for i, a in enumerate(argv) if not (a.startswith(ours) or (i and argv[i - 1] in ours))]
    if max_restarts > 0:
        for key, value in RESTART_ENV.items():
            os.environ.setdefault(key, value)
    os.execv(sys.executable, torchrun_command(nproc, "genfoundry", args, max_restarts))
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if args.command == "train" and args.max_restarts < 0:
        parser.error(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.command == "train" and (args.nproc > 1 or args.max_restarts > 0) and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args.nproc, argv, args.max_restarts)
    if args.command == "curate" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args.nproc, argv)
    if args.command == "report" and not rest:  # no torch: training starts this to rebuild a live run's page
        from genfoundry.report import build_report

        try:
            print(f"report: {build_report(args.run_dir, args.out, args.curation)}")
        except GenfoundryError as e:
            print(f"genfoundry report: error: {e}", file=sys.stderr)
            return 2
        return 0
    from genfoundry import api  # after parsing, so that --help stays fast

    ranked = "WORLD_SIZE" in os.environ
    if ranked:  # one rank of many: a native abort prints every thread's Python stack
        faulthandler.enable()
    try:
        if args.command in ("train", "demo"):
            overrides = config_lib.parse_overrides(rest)
            cfg = config_lib.load(getattr(args, "config", "demo"), overrides)
            if args.dry_run:
                api.check_names(cfg)
                print(config_lib.dumps(cfg), end="")
                return 0
            if args.command == "train":
                api.train(cfg)
            else:
                api.demo(overrides)
            return 0
        if args.command == "curate":
            from genfoundry.curation import curate
            from genfoundry.curation.config import load_curate

            cfg = load_curate(args.config, config_lib.parse_overrides(rest))
            if args.dry_run:
                print(config_lib.dumps(cfg), end="")
                return 0
            curate(args.src, args.out, cfg, ray=args.ray)
            return 0
        if args.command == "bench" and args.bench == "compression":
            from genfoundry.bench.compression import METHODS
            from genfoundry.bench.compression import run as run_compression

            config_lib.parse_overrides(rest)  # one clear error for a malformed override
            run_compression(args.nproc, args.config, rest, args.out, args.method or METHODS, args.workdir)
            return 0
        if args.command == "tune":
            from genfoundry.tuning import tune

            tune(args.study, args.trials, args.search, args.space, args.config, config_lib.parse_overrides(rest),
                 args.metric, args.pruner, args.storage, args.fid_samples, args.heartbeat_s, args.enqueue,
                 args.sampler_seed, args.prune_startup_trials, args.prune_warmup_steps, args.dry_run)
            return 0
        if args.command == "chaos":
            from genfoundry import chaos

            result = chaos.run(args.config, args.trials, args.ranks, args.steps, args.faults, args.seed,
                               args.max_restarts, args.workdir, args.out, rest, args.trial_timeout)
            return 0 if result["bit_exact"] == result["trials"] else 1
        if args.command == "bench" and args.bench == "comm":
            from genfoundry.distributed.launch import torchrun_command

            command = torchrun_command(args.nproc, "genfoundry.bench.comm", [
                "--iters", str(args.iters), *(["--sizes", *map(str, args.sizes)] if args.sizes else []),
                *(["--out", args.out] if args.out else []), *rest])
            os.execv(sys.executable, command)
        if args.command == "bench" and args.bench == "curate":
            from genfoundry.bench.curate import main as bench_curate

            bench_curate(rest)  # its own options, parsed there
            return 0
        if args.command == "bench" and args.bench == "convergence":
            from genfoundry.bench.convergence import main as bench_convergence

            bench_convergence(rest)  # its own options, parsed there
            return 0
        if args.command == "bench" and args.bench == "sample":
            from genfoundry.bench.sample import main as bench_sample

            bench_sample(rest)  # its own options, parsed there
            return 0
        if args.command == "bench" and args.bench == "report":
            from genfoundry.bench.report import main as bench_report

            bench_report(rest)  # its own options, parsed there
            return 0
        if args.command == "bench" and args.bench == "checkpoint":
            from genfoundry.bench.checkpoint import main as bench_checkpoint

            bench_checkpoint(rest)  # its own options, parsed there
            return 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "sample":
            solver = _solver_values(args)
            info = api.sample(args.run_dir, args.out, args.num_images, seed=args.seed, weights=args.weights,
                              device=args.device, write_images=not args.grid_only, classes=args.classes,
                              snapshot=args.snapshot, **solver)
            if info["ranks"] == 1 or int(os.environ.get("RANK", 0)) == 0:
                print(f"wrote {info['num_images']} images to {info['out_dir']} in {info['sampling_s']:.1f} s")
        elif args.command == "pack":
            from genfoundry.shards.pack import pack, summary

            index = pack(args.src, args.out, args.samples_per_shard, args.resolution, args.image_format,
                         args.quality, args.workers)
            print(summary(index, args.out))
        elif args.command == "bench" and args.bench == "data":
            from genfoundry.bench.data import run as run_data

            run_data(args.workers, args.batch_size, args.images, args.seconds, baseline_python=args.baseline_python,
                     device=args.device, out=args.out, workdir=args.workdir, width=args.size[0],
                     height=args.size[1], crop=args.crop, decode=args.decode, profile=args.profile,
                     fast_jpeg=args.fast_jpeg)
        elif args.command == "bench":
            from genfoundry.bench.throughput import run

            precisions = args.precision or ["bf16"]
            run(args.preset or ["DiT-B/2"], args.batch_size or [256], precisions[0], args.compile or ["blocks"],
                args.steps, args.out, args.device, not args.no_baseline, precisions, args.profile, args.image_size,
                args.channels, args.classes, args.cuda_graphs)
        elif args.command == "eval":
            api.evaluate(args.run_dir, args.num_samples, args.reference, args.split, args.device,
                         resize=args.resize, max_reference_images=args.max_reference_images, weights=args.weights,
                         snapshot=args.snapshot, **_solver_values(args))
        return 0
    except GenfoundryError as e:  # a user mistake: its one-line message, no traceback
        print(f"genfoundry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from genfoundry.distributed.parallel import PeerLostError

        if not isinstance(e, PeerLostError):
            raise
        print(f"genfoundry {args.command}: error: {e}; run the same command again to resume from the last "
              f"checkpoint", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"genfoundry {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if ranked:  # what an error's traceback held (a trainer, its DDP reducer), freed before teardown
            gc.collect()


if __name__ == "__main__":
    sys.exit(main())
