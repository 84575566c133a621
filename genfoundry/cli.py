"""Command line: parses arguments, resolves the config, calls one library function per command."""

from __future__ import annotations

import argparse
import sys

from genfoundry import config as config_lib

OVERRIDE_HELP = ("config overrides as --section.key=value (e.g. --train.lr=3e-4 --run.name=exp1); "
                 "sections: run, data, model, diffusion, train, sample, eval")


def _config_args(p: argparse.ArgumentParser, default_recipe: str | None) -> None:
    p.add_argument("--config", default=default_recipe, metavar="RECIPE",
                   help=f"a recipe name shipped with genfoundry or a .toml path (default: {default_recipe or 'none'})")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genfoundry",
        description="Image generation end to end: train a DiT with flow matching, sample, score FID.",
        epilog="Run `genfoundry COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="train on MNIST, write sample grids and FID (a few minutes on a CPU)",
                       description="Trains the shipped 'demo' recipe on MNIST, writes sample grids during and "
                                   "after training, scores FID/KID, and writes runs/demo/.", epilog=OVERRIDE_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("train", help="train or resume a run (running the same command again resumes)",
                       description="Trains the run the config describes; a run directory that already holds "
                                   "checkpoints is resumed exactly.", epilog=OVERRIDE_HELP)
    _config_args(p, "mnist")

    p = sub.add_parser("sample", help="write a sample grid and PNG images from a finished run")
    p.add_argument("run_dir", help="a run directory (e.g. runs/demo)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/samples/sampled)")
    p.add_argument("--num-images", type=int, help="images to generate, class-balanced (default: a grid of per_class per class)")
    p.add_argument("--sampler", choices=["euler", "heun"], help="ODE solver (default: the run's)")
    p.add_argument("--steps", type=int, help="ODE steps (default: the run's)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance weight; 1 disables (default: the run's)")
    p.add_argument("--seed", type=int, help="base seed; image i uses noise seeded by (seed, i)")
    p.add_argument("--batch-size", type=int, help="images per network call; does not change the images")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: ema)")
    p.add_argument("--grid-only", action="store_true", help="write only the grid, not every image")
    p.add_argument("--device", default="auto", help="device, e.g. cpu or cuda:0 (default: auto)")

    p = sub.add_parser("eval", help="FID and KID of a finished run's samples against a reference set")
    p.add_argument("run_dir", help="a run directory (e.g. runs/demo)")
    p.add_argument("--num-samples", type=int, help="generated images to score (default: the run's eval.num_samples)")
    p.add_argument("--reference", help="reference dataset (default: the run's training source)")
    p.add_argument("--split", help="reference split (default: train)")
    p.add_argument("--device", default="auto", help="device, e.g. cpu or cuda:0 (default: auto)")
    p = sub.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    b = bench.add_parser("train", help="training images/s and MFU of DiT presets on random latents")
    b.add_argument("--preset", action="append", help="model preset, repeatable (default: DiT-B/2)")
    b.add_argument("--batch-size", type=int, default=256, help="images per step (default: 256)")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16", help="default: bf16")
    b.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    b.add_argument("--steps", type=int, default=30, help="timed steps after warm-up (default: 30)")
    b.add_argument("--out", help="write the results as JSON here")
    b.add_argument("--device", default="auto", help="device (default: auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    from genfoundry import api  # after parsing, so that --help stays fast

    try:
        if args.command in ("train", "demo"):
            overrides = config_lib.parse_overrides(rest)
            cfg = config_lib.load(getattr(args, "config", "demo"), overrides)
            if args.dry_run:
                print(config_lib.dumps(cfg), end="")
                return 0
            if args.command == "train":
                api.train(cfg)
            else:
                api.demo(overrides)
            return 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "sample":
            info = api.sample(args.run_dir, args.out, args.num_images, args.sampler, args.steps, args.cfg_scale,
                              args.seed, args.batch_size, args.weights, args.device, not args.grid_only)
            print(f"wrote {info['num_images']} images to {info['out_dir']}")
        elif args.command == "bench":
            from genfoundry.bench.throughput import run

            run(args.preset or ["DiT-B/2"], args.batch_size, args.precision, not args.no_compile, args.steps,
                args.out, args.device)
        elif args.command == "eval":
            api.evaluate(args.run_dir, args.num_samples, args.reference, args.split, args.device)
        return 0
    except (ValueError, FileNotFoundError) as e:  # user mistakes carry a one-line message
        print(f"genfoundry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genfoundry {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
