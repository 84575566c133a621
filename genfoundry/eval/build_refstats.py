"""Computes FID reference statistics of a dataset split, image folder or shard set and writes them as .npz.

The statistics shipped in genfoundry/eval/refstats/ were made with this module on one GPU:

    python -m genfoundry.eval.build_refstats --source mnist --split train --resolution 28 --channels 1 \
        --device cuda --out genfoundry/eval/refstats

It runs the same preprocessing and network as on the CPU (resize with PIL on host threads), so the
numbers equal a CPU computation up to the GPU's float32 arithmetic. The file records the reference's
identity (genfoundry.eval.reference.Reference), so `genfoundry eval` uses it only for that reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from genfoundry.config import EvalConfig
from genfoundry.features import InceptionFeatures, prepare
from genfoundry.eval.fid import FeatureStats, feature_stats, stats_paths
from genfoundry.eval.reference import Reference, images, resolve
from genfoundry.progress import bar


def compute(ref: Reference, device: str, batch_size: int = 500, threads: int = 16) -> tuple[FeatureStats, float]:
    """The statistics of `ref` and the images per second it took."""
    found = images(ref, batch_size)
    net = InceptionFeatures(device, batch_size, ref.resize)
    features = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool, bar(found.num_images, "fid: reference") as shown:
        # PIL releases the GIL while resizing, so host threads prepare batches while the GPU runs.
        for x in pool.map(functools.partial(prepare, resize=ref.resize), found.batches):
            features.append(net.forward(x))
            shown.update(len(x))
    features = np.concatenate(features)
    stats = feature_stats(features, ref.label)
    stats.reference, stats.num_left_out = ref, len(found.left_out)
    return stats, len(features) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="mnist, fashion-mnist, an image folder or a shard set")
    p.add_argument("--split", default="train", help="split of a named dataset (default: train)")
    p.add_argument("--resolution", type=int, required=True, help="image side the samples are made at")
    p.add_argument("--channels", type=int, choices=[1, 3], required=True, help="channels the samples have")
    p.add_argument("--resize", choices=EvalConfig.RESIZE_CONVENTIONS, default=EvalConfig.resize,
                   help=f"how images reach 299 px (default: {EvalConfig.resize})")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True, help="directory for the .npz file")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="also write the features of the first N images (check-N.npy) to compare across devices")
    args = p.parse_args()
    ref = resolve(args.source, args.split, args.resolution, args.channels, args.resize)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.check:
        first = next(images(dataclasses.replace(ref, max_images=args.check), args.check).batches)
        np.save(Path(args.out) / f"check-{args.check}.npy", InceptionFeatures(args.device, resize=ref.resize)(first))
    stats, rate = compute(ref, args.device)
    path = Path(args.out) / f"{ref.file_stem}.npz"
    stats.save(path)
    print(f"{path}: {stats.num_images} images, {rate:.0f} images/s, |mu| {np.linalg.norm(stats.mu):.4f}, "
          f"tr(sigma) {np.trace(stats.sigma):.4f}, {stats.num_left_out} left out; shipped under this name or "
          f"cached as {stats_paths(ref)[1].name}, genfoundry eval uses it")


if __name__ == "__main__":
    main()
