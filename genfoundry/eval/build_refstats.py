"""Computes FID reference statistics of a dataset split and writes them as .npz.

The statistics shipped in genfoundry/eval/refstats/ were made with this module on one GPU:

    python -m genfoundry.eval.build_refstats --source mnist --split train --device cuda \
        --out genfoundry/eval/refstats

It runs the same preprocessing and network as on the CPU (resize with PIL on host threads), so the
numbers equal a CPU computation up to the GPU's float32 arithmetic.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from genfoundry.eval.features import InceptionFeatures, prepare
from genfoundry.eval.fid import feature_stats, stats_name
from genfoundry.sources import load_images


def compute(source: str, split: str, device: str, batch_size: int = 500, threads: int = 16) -> tuple:
    images = load_images(source, split).images
    net = InceptionFeatures(device, batch_size)
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    features = np.empty((len(images), 2048))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        # PIL releases the GIL while resizing, so host threads prepare batches while the GPU runs.
        for k, x in enumerate(pool.map(prepare, chunks)):
            features[k * batch_size: k * batch_size + len(x)] = net.forward(x)
    seconds = time.perf_counter() - t0
    return feature_stats(features, f"{source}:{split}"), len(images) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True, help="directory for the .npz file")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="also write the features of the first N images (check-N.npy) to compare across devices")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.check:
        images = load_images(args.source, args.split).images[:args.check]
        np.save(Path(args.out) / f"check-{args.check}.npy", InceptionFeatures(args.device)(images))
    stats, rate = compute(args.source, args.split, args.device)
    path = Path(args.out) / stats_name(args.source, args.split)
    stats.save(path)
    print(f"{path}: {stats.num_images} images, {rate:.0f} images/s, |mu| {np.linalg.norm(stats.mu):.4f}, "
          f"tr(sigma) {np.trace(stats.sigma):.4f}")


if __name__ == "__main__":
    main()
