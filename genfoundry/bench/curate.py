"""Curation benchmarks: stage-1 images/s per core, stages 2-3 images/s on the accelerator, and how well the
quality stage catches injected corruptions (FD of the kept set against a random subset of its size).

Every figure times the product's own path (`genfoundry.curation.curate` for stage 1, `deep.score_slice`
with the curation's worker pool for stages 2-3). Baselines, from the same run: stage 1 against a plain
loop (Pillow decode + imagehash.phash of the full image + SHA-256, one process); stages 2-3 against the
same models fed by decoding in the main process, one image after another.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from genfoundry.progress import bar

WIDTH, HEIGHT = 500, 375


def photo_set(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 500x375 JPEGs cut from scikit-image's colour photos (random crops, flips, scales),
    or from smooth random fields where scikit-image is absent."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("*.jpg"))
    if len(paths) >= count:
        return paths[:count]
    rng = np.random.default_rng(seed)
    try:
        import skimage.data as data

        bases = [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "chelsea", "coffee", "rocket",
                                                                "immunohistochemistry", "hubble_deep_field")]
    except ImportError:
        bases = [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
                 for _ in range(6)]
    with bar(count, "bench curate: photos") as shown:
        for n in range(count):
            base = bases[n % len(bases)]
            scale = rng.uniform(1.0, 1.6)
            big = base.resize((max(WIDTH, int(base.width * scale)), max(HEIGHT, int(base.height * scale))),
                              Image.BILINEAR)
            x, y = rng.integers(0, big.width - WIDTH + 1), rng.integers(0, big.height - HEIGHT + 1)
            image = big.crop((x, y, x + WIDTH, y + HEIGHT))
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            image.save(folder / f"{n:06d}.jpg", quality=90)
            shown.update()
    return sorted(folder.glob("*.jpg"))[:count]


def plain_stage1(paths: list[Path]) -> float:
    """Images/s of the loop a notebook writes: decode, perceptual hash of the full image, SHA-256."""
    import imagehash
    from PIL import Image

    start = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            imagehash.phash(image)
    return len(paths) / (time.perf_counter() - start)


def stage1(workdir: Path, images: int, workers: int) -> dict:
    from genfoundry.curation.config import load_curate
    from genfoundry.curation import curate

    paths = photo_set(workdir / "photos", images)
    cores = workers or os.cpu_count() or 1
    out = workdir / "stage1"
    cfg = load_curate(None, {"run.stages": "basic", "run.workers": cores, "basic.min_side": 256,
                             "basic.near_dedup_bits": -1})
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = curate([str(workdir / "photos")], str(out), cfg, print_fn=lambda *_: None)
    seconds = time.perf_counter() - start
    baseline = plain_stage1(paths[: min(len(paths), 300)])
    return {"images": len(paths), "processes": cores, "seconds": seconds, "images_per_s": len(paths) / seconds,
            "images_per_s_per_core": len(paths) / seconds / cores, "kept": summary["num_kept"],
            "baseline_plain_loop_images_per_s_per_core": baseline,
            "note": "wall time of genfoundry.curate(run.stages=basic) including listing, process start-up and "
                    "the manifest; the baseline is one process"}


def deep(workdir: Path, images: int, workers: int, device: str, filters: list[str], batch: int) -> dict:
    from multiprocessing import get_context

    from genfoundry.accel import get_device, synchronize
    from genfoundry.curation import filters as registry
    from genfoundry.curation.deep import Job, Models, score_slice
    from genfoundry.curation.inputs import Item

    paths = photo_set(workdir / "photos", images)
    items = [Item(str(p)) for p in paths]
    dev = get_device(device)
    built = [registry.build(name, device=str(dev)) for name in filters]
    models = Models(built, True, str(dev))
    job = Job(built, True)
    cores = workers or os.cpu_count() or 1
    warm = score_slice(items[:batch], job, models, None, batch)  # loads every model, compiles kernels
    assert "features" in warm
    with get_context("spawn").Pool(cores) as pool:
        score_slice(items[:batch * 2], job, models, pool, batch)  # workers started and imported
        synchronize(dev)
        with bar(len(items), "bench curate: stages 2-3") as shown:  # moved once a batch
            start = time.perf_counter()
            score_slice(items, job, models, pool, batch, progress=shown.update)
            synchronize(dev)
        seconds = time.perf_counter() - start
    few = items[: min(len(items), 256)]
    start = time.perf_counter()
    score_slice(few, job, models, None, batch)
    synchronize(dev)
    baseline = len(few) / (time.perf_counter() - start)
    return {"images": len(items), "device": str(dev), "filters": filters, "inception": True, "processes": cores,
            "batch_size": batch, "seconds": seconds, "images_per_s": len(items) / seconds,
            "baseline_main_process_decode_images_per_s": baseline}


def corrupted_mnist(workdir: Path, clean: int, reference: int, share: float, seed: int = 0) -> tuple[Path, Path, set]:
    """A collection of MNIST test digits with `share` of them replaced by corruptions (noise, blur, inverted,
    occluded, shifted) and a held-out reference of MNIST training digits, as PNG folders."""
    from PIL import Image, ImageFilter

    from genfoundry.sources import load_mnist

    rng = np.random.default_rng(seed)
    src, ref = workdir / "mnist-collection", workdir / "mnist-reference"
    made = workdir / "mnist-corrupted.json"  # made once (where MNIST is installed), reusable elsewhere
    if made.is_file():
        known = json.loads(made.read_text())
        if known["clean"] == clean and known["reference"] == reference and known["share"] == share:
            return src, ref, set(known["corrupted"])
    for folder in (src, ref):
        folder.mkdir(parents=True, exist_ok=True)
    test, train = load_mnist("test").images[..., 0], load_mnist("train").images[..., 0]
    for i in range(reference):
        Image.fromarray(train[i]).save(ref / f"r{i:05d}.png")
    bad = set()
    kinds = ("noise", "blur", "inverted", "occluded", "shifted")
    for i in range(clean):
        image = test[i]
        name = f"c{i:05d}.png"
        if rng.random() < share:
            kind = kinds[i % len(kinds)]
            if kind == "noise":
                image = rng.integers(0, 256, image.shape, dtype=np.uint8)
            elif kind == "blur":
                image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(3)))
            elif kind == "inverted":
                image = 255 - image
            elif kind == "occluded":
                image = image.copy()
                image[6:22, 6:22] = 255
            else:
                image = np.roll(image, (12, 12), axis=(0, 1))
            name = f"c{i:05d}-{kind}.png"
            bad.add(name)
        Image.fromarray(image).save(src / name)
    from genfoundry.checkpoint.storage import write_atomic

    write_atomic(made, json.dumps({"clean": clean, "reference": reference, "share": share,
                                   "corrupted": sorted(bad)}).encode())
    return src, ref, bad


def quality(workdir: Path, clean: int, reference: int, share: float, device: str, keep: float) -> dict:
    import pyarrow.parquet as pq

    from genfoundry.curation.config import load_curate
    from genfoundry.curation import curate

    src, ref, bad = corrupted_mnist(workdir, clean, reference, share)
    out = {}
    for where in ("reference", "self"):
        cfg = load_curate(None, {"run.stages": "basic,quality", "basic.min_side": 16, "basic.min_bytes": 0,
                                 "basic.near_dedup_bits": -1, "basic.exact_dedup": False, "run.device": device,
                                 "quality.keep_quantile": keep, "quality.reference": str(ref) if where == "reference"
                                 else ""})
        summary = curate([str(src)], str(workdir / f"quality-{where}"), cfg, print_fn=lambda *_: None)
        rows = pq.read_table(workdir / f"quality-{where}" / "manifest.parquet").to_pylist()
        dropped = {Path(r["source"]).name for r in rows if r["reason"] == "low-density"}
        by_kind = {}
        for name in bad:
            kind = name.split("-")[1].split(".")[0]
            caught, total = by_kind.get(kind, (0, 0))
            by_kind[kind] = (caught + (name in dropped), total + 1)
        q = summary["quality"]
        out[where] = {"caught": len(dropped & bad), "corrupted": len(bad), "dropped": len(dropped),
                      "clean_dropped": len(dropped - bad), "by_kind": {k: {"caught": c, "of": t}
                                                                       for k, (c, t) in sorted(by_kind.items())},
                      "fd_kept": q["fd_kept"], "fd_random": q["fd_random"], "shrinkage": q["shrinkage"],
                      "num_reference": q["num_reference"]}
    return {"collection": clean, "reference_images": reference, "corrupted_share": share, "keep_quantile": keep,
            **out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="genfoundry bench curate", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="+", choices=["stage1", "deep", "quality"])
    p.add_argument("--images", type=int, default=2000, help="500x375 JPEGs for stage1 and deep (default: 2000)")
    p.add_argument("--workers", type=int, default=0, help="decode processes (default: all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--filters", default="blank,imagenet", help="semantic filters timed by 'deep'")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mnist", type=int, default=2000, help="collection size for 'quality' (default: 2000)")
    p.add_argument("--reference", type=int, default=2000, help="held-out reference images (default: 2000)")
    p.add_argument("--corrupted", type=float, default=0.1, help="share of the collection corrupted (default: 0.1)")
    p.add_argument("--keep", type=float, default=0.9, help="quality.keep_quantile (default: 0.9)")
    p.add_argument("--workdir", default="bench-curate")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    result = {}
    if "stage1" in args.what:
        result["stage1"] = stage1(workdir, args.images, args.workers)
    if "deep" in args.what:
        result["deep"] = deep(workdir, args.images, args.workers, args.device,
                              [f for f in args.filters.split(",") if f], args.batch_size)
    if "quality" in args.what:
        result["quality"] = quality(workdir, args.mnist, args.reference, args.corrupted, args.device, args.keep)
    print(json.dumps(result, indent=1))
    if args.out:
        from genfoundry.checkpoint.storage import write_atomic

        write_atomic(args.out, json.dumps(result, indent=1).encode())
    return result
