"""Data-loading throughput: genfoundry's DataPipeline against torchvision's standard ImageNet recipe.

Both read the same JPEGs (500x375, quality 90, made from scikit-image's photos) and produce the same
batches: RandomResizedCrop(256) with the default scale (0.08, 1), horizontal flip, normalization,
batch 64, with the same number of worker processes. The baseline runs in a Python that has
torchvision (`--baseline-python`), since torchvision does not import beside the CPU build of torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from genfoundry.checkpoint.storage import write_atomic
from genfoundry.errors import ConfigError
from genfoundry.progress import bar

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

BASELINE = r'''
import sys, time, json, torch, torchvision
from torchvision import datasets, transforms as T
folder, workers, batch, seconds, warmup, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(1)
tf = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
ds = datasets.ImageFolder(folder, transform=tf)
dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                 persistent_workers=workers > 0)
n, t0, done = 0, None, False
while not done:
    for k, (x, y) in enumerate(dl):
        if t0 is None and k + 1 >= warmup:
            t0 = time.perf_counter(); continue
        if t0 is not None:
            n += x.shape[0]
            if time.perf_counter() - t0 >= seconds:
                done = True; break
print(json.dumps({"images_per_s": n / (time.perf_counter() - t0), "images": n, "torch": torch.__version__,
                  "torchvision": torchvision.__version__}))
'''


def make_jpegs(out: str | Path, count: int = 2000, width: int = 500, height: int = 375, quality: int = 90,
               seed: int = 0) -> Path:
    """`count` JPEGs from scikit-image's photos with random crops, flips and colour shifts, in 2 classes."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
             "retina", "motorcycle_left", "logo"]
    photos = []
    for name in names:
        try:
            im = np.asarray(getattr(skimage.data, name)())
        except Exception:  # some photos need an optional download; the rest suffice
            continue
        if im.ndim == 3 and im.shape[2] >= 3 and min(im.shape[:2]) >= 200:
            photos.append(im[..., :3])
    rng = np.random.default_rng(seed)
    out = Path(out)
    for c in ("a", "b"):
        (out / c).mkdir(parents=True, exist_ok=True)
    with bar(count, "bench data: JPEGs") as shown:
        for i in range(count):
            src = photos[i % len(photos)]
            h, w = src.shape[:2]
            ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
            y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = src[y0:y0 + ch, x0:x0 + cw].astype(np.float32)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.clip(crop * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-20, 20, size=3), 0, 255)
            Image.fromarray(crop.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC).save(
                out / ("a" if i % 2 else "b") / f"{i:05d}.jpg", quality=quality)
            shown.update()
    return out


class _RssSampler(threading.Thread):
    """Samples the resident memory of this process and its children every `interval` seconds."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    def run(self):
        t0 = time.perf_counter()
        while not self.stop.is_set():
            self.samples.append((round(time.perf_counter() - t0, 2), _tree_rss_mb(os.getpid())))
            time.sleep(self.interval)


def _tree_rss_mb(pid: int) -> float:
    total = 0
    for p in [pid] + _children(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 2**20


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def genfoundry_throughput(shards: str, workers: int, batch: int, seconds: float, warmup: int, device: str,
                          crop: int = 256, gpu_decode: bool | None = None, profile: bool = False,
                          decode_in_workers: bool = True, fast_jpeg: bool = False) -> dict:
    import torch

    from genfoundry import accel
    from genfoundry.data import DataPipeline, Normalize, RandomHorizontalFlip, RandomResizedCrop

    torch.set_num_threads(1)
    pipeline = DataPipeline(fast_jpeg=fast_jpeg)
    for t in (RandomResizedCrop(crop), RandomHorizontalFlip(), Normalize(MEAN, STD)):
        pipeline.add_transform(t)
    dev = accel.get_device(device)
    loader = pipeline.loader(shards, batch, device=dev, seed=0, num_workers=workers, rank=0, world_size=1,
                             gpu_decode=gpu_decode, decode_in_workers=decode_in_workers)
    rss = _RssSampler()
    rss.start()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    n = _run_for(seconds, "bench data: genfoundry", lambda: next(it).images.shape[0])
    accel.synchronize(dev)
    rate = n / (time.perf_counter() - t0)
    hot = _hottest(profiler) if profiler else None
    rss.stop.set()
    rss.join()
    used = None
    if dev.type == "cuda":  # the whole device's, worker processes' contexts and caches included
        free, total = torch.cuda.mem_get_info(dev)
        used = (total - free) / 2**30
    where = "workers" if loader.worker_decode else "main process"
    label = loader.mode + ("" if loader.mode == "cpu" else f" ({where})") + (", fast JPEG" if fast_jpeg else "")
    return {"images_per_s": rate, "images": n, "decode": label,
            "rss_mb_over_time": rss.samples, "peak_rss_mb": max(m for _, m in rss.samples),
            "device_memory_used_gb": used, "main_process_profile": hot}


def _run_for(seconds: float, desc: str, step) -> int:
    """Calls `step()`, which returns how many images it made, until `seconds` have passed; the images made.
    Its bar counts the seconds and moves once a second: moved per call it would cost time the rate counts."""
    n, t0, tick = 0, time.perf_counter(), 1
    with bar(round(seconds), desc, unit="s") as shown:
        while (elapsed := time.perf_counter() - t0) < seconds:
            n += step()
            if elapsed >= tick:
                shown.set_postfix_str(f"{n / elapsed:.0f} img/s", refresh=False)
                shown.update(int(elapsed) + 1 - tick)
                tick = int(elapsed) + 1
        shown.update(round(seconds) + 1 - tick)
    return n


def _hottest(profiler, count: int = 20) -> list[dict]:
    """The main process's functions with the most time of their own: where the loader's time goes."""
    import pstats

    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}:{name}", "calls": calls, "own_s": own, "cumulative_s": cum}
            for (file, line, name), (_, calls, own, cum, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_s"])[:count]


def raw_gpu_decode(folder: Path, batch: int, seconds: float, device: str) -> dict | None:
    """Batched nvJPEG decode of the same files (torchvision.io.decode_jpeg on the device), no resize:
    the reference a GPU-decode path is measured against. None where torchvision or the GPU is missing."""
    try:
        import torch
        import torchvision.io
    except ImportError:
        return None
    if not device.startswith("cuda"):
        return None
    data = [torchvision.io.read_file(str(p)) for p in sorted(folder.rglob("*.jpg"))]
    batches = [data[i:i + batch] for i in range(0, len(data) - batch + 1, batch)]
    for b in batches[:3]:
        torchvision.io.decode_jpeg(b, device=device)
    torch.cuda.synchronize()

    def every_batch() -> int:
        for b in batches:
            torchvision.io.decode_jpeg(b, device=device)
        torch.cuda.synchronize()
        return sum(len(b) for b in batches)

    t0 = time.perf_counter()
    n = _run_for(seconds, "bench data: decode_jpeg", every_batch)
    return {"images_per_s": n / (time.perf_counter() - t0), "torchvision": torchvision.__version__}


def run(workers: int = 2, batch: int = 64, count: int = 2000, seconds: float = 30.0, warmup: int = 3,
        baseline_python: str | None = None, device: str = "cpu", out: str | None = None,
        workdir: str | None = None, width: int = 500, height: int = 375, crop: int = 256,
        decode: str = "auto", profile: bool = False, fast_jpeg: bool = False) -> dict:
    from genfoundry.shards import pack

    work = Path(workdir or tempfile.mkdtemp(prefix="genfoundry-bench-data-"))
    folder = work / "jpegs"
    if not folder.exists():
        print(f"writing {count} JPEGs to {folder}", flush=True)
        make_jpegs(folder, count, width, height)
    shards = work / "shards"
    pack(str(folder), str(shards), samples_per_shard=500)
    gpu = {"auto": None, "gpu": True, "gpu-main": True, "cpu": False}[decode]
    ours = genfoundry_throughput(str(shards), workers, batch, seconds, warmup, device, crop, gpu, profile,
                                 decode_in_workers=decode != "gpu-main", fast_jpeg=fast_jpeg)
    print(f"genfoundry DataPipeline ({ours['decode']} decode): {ours['images_per_s']:.0f} images/s "
          f"(peak RSS {ours['peak_rss_mb']:.0f} MB"
          + (f", accelerator memory in use {ours['device_memory_used_gb']:.1f} GB)" if ours.get("device_memory_used_gb")
             else ")"), flush=True)
    for row in ours["main_process_profile"] or []:
        print(f"  {row['own_s']:7.3f} s own {row['cumulative_s']:7.3f} s cum {row['calls']:>8} calls  {row['function']}")
    result = {"format_version": 1, "benchmark": "data", "workers": workers, "batch_size": batch,
              "images_on_disk": count, "image_size": [width, height], "jpeg_quality": 90, "fast_jpeg": fast_jpeg,
              "pipeline": f"RandomResizedCrop({crop}, scale=(0.08, 1)) -> RandomHorizontalFlip -> Normalize",
              "genfoundry": {k: v for k, v in ours.items()}, "cpu_count": os.cpu_count()}
    if baseline_python:
        try:
            proc = subprocess.run([baseline_python, "-c", BASELINE, str(folder), str(workers), str(batch),
                                   str(seconds), str(warmup), str(crop)], capture_output=True, text=True)
        except OSError as e:
            raise ConfigError(f"--baseline-python '{baseline_python}' cannot be run: {e.strerror or e}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"baseline failed: {proc.stderr.strip().splitlines()[-1]}")
        base = json.loads(proc.stdout.strip().splitlines()[-1])
        result["torchvision_baseline"] = base
        result["speedup"] = ours["images_per_s"] / base["images_per_s"]
        print(f"torchvision baseline: {base['images_per_s']:.0f} images/s; genfoundry is "
              f"{result['speedup']:.2f}x", flush=True)
    raw = raw_gpu_decode(folder, batch, seconds, device)
    if raw:
        result["raw_gpu_decode"] = raw
        print(f"raw batched decode_jpeg on {device} (no resize): {raw['images_per_s']:.0f} images/s", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), json.dumps(result, indent=2).encode())
    return result


if __name__ == "__main__":
    run(baseline_python=sys.argv[1] if len(sys.argv) > 1 else None)
