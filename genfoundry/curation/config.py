"""The curation's typed configuration: one dataclass per stage, in `genfoundry curate`'s sections
[run], [basic], [semantic] and [quality]; loaded and overridden like the training config."""

from __future__ import annotations

from dataclasses import dataclass, field

from genfoundry.config import apply_overrides, load_file
from genfoundry.errors import ConfigError

COLOUR_RULES = ("convert", "reject")


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass
class CurateRunConfig:
    stages: str = "basic,semantic,quality"  # stages to run, in this order; a later stage needs the earlier ones
    workers: int = 0             # decode processes (0: all cores)
    device: str = "auto"         # where stages 2-3 run: auto | cpu | cuda | cuda:N | ...
    slice_size: int = 1024       # inputs per slice: the unit of resuming and of sharing work between ranks
    seed: int = 0                # the random subset FD(kept) is compared with

    def __post_init__(self):
        stages = _names(self.stages)
        if not stages or stages != [s for s in ("basic", "semantic", "quality") if s in stages] or stages[0] != "basic":
            raise ConfigError(f"run.stages must be 'basic', 'basic,semantic', 'basic,quality' or "
                              f"'basic,semantic,quality', got '{self.stages}'")
        if self.workers < 0 or self.slice_size < 1:
            raise ConfigError("run.workers must be 0 (all cores) or more and run.slice_size at least 1")


@dataclass
class BasicConfig:
    min_side: int = 512          # px: the shorter side, upright; smaller images are dropped
    max_aspect: float = 3.0      # the longer side over the shorter at most
    min_bytes: int = 1024        # smaller files are dropped
    max_pixels: int = 89478485   # decompression-bomb limit (Pillow's): width x height at most
    formats: str = "JPEG,PNG,WEBP,BMP,TIFF,GIF,MPO"  # allowed formats, as the file's content says (not its name)
    cmyk: str = "convert"        # CMYK images: convert (to RGB) | reject
    high_bit_depth: str = "convert"  # 16-bit and float images: convert (scaled to 8 bits) | reject
    alpha: str = "convert"       # transparency (alpha or a palette's transparent colour): convert (drop it) | reject
    animated: str = "reject"     # animated GIF/WebP/PNG: convert (first frame) | reject
    exif_rotation: str = "convert"  # EXIF-rotated images: convert (rotated upright) | reject
    exact_dedup: bool = True     # drop byte-identical copies (SHA-256), keeping the first path
    near_dedup_bits: int = 4     # drop images whose 64-bit perceptual hash is within this Hamming distance
                                 # of an earlier one's (-1: off)

    def __post_init__(self):
        for key in ("cmyk", "high_bit_depth", "alpha", "animated", "exif_rotation"):
            if getattr(self, key) not in COLOUR_RULES:
                raise ConfigError(f"basic.{key} must be convert or reject, got '{getattr(self, key)}'")
        if self.min_side < 1 or self.max_aspect < 1 or self.min_bytes < 0 or self.max_pixels < 1:
            raise ConfigError("basic.min_side and basic.max_pixels must be at least 1, basic.max_aspect at least 1, "
                              "basic.min_bytes 0 or more")
        if not -1 <= self.near_dedup_bits <= 31:
            raise ConfigError(f"basic.near_dedup_bits must be -1 (off) to 31, got {self.near_dedup_bits}")
        if not _names(self.formats):
            raise ConfigError("basic.formats must name at least one format, e.g. JPEG,PNG")

    @property
    def format_set(self) -> set[str]:
        return {f.upper() for f in _names(self.formats)}


@dataclass
class SemanticConfig:
    filters: str = "blank,imagenet,ocr,nsfw"  # semantic filters in order, or module:factory for your own
    thresholds: str = ""         # name=value,... to replace a filter's default threshold
    batch_size: int = 64         # images per model call
    dedup: bool = True           # semantic dedup (SemDeDup): k-means on embeddings, then cosine within clusters
    dedup_embedder: str = "imagenet"  # the filter whose embeddings dedup uses
    dedup_similarity: float = 0.95    # drop images this similar (cosine) to an earlier one in their cluster
    dedup_clusters: int = 0      # k-means clusters (0: about the square root of the image count)

    def __post_init__(self):
        for item in _names(self.thresholds):
            name, eq, value = item.partition("=")
            try:
                float(value)
            except ValueError:
                eq = ""
            if not eq:
                raise ConfigError(f"semantic.thresholds takes name=value pairs, e.g. ocr=0.2,nsfw=0.6; got '{item}'")
        if self.batch_size < 1 or not 0 < self.dedup_similarity <= 1 or self.dedup_clusters < 0:
            raise ConfigError("semantic.batch_size must be at least 1, semantic.dedup_similarity in (0, 1], "
                              "semantic.dedup_clusters 0 (auto) or more")

    @property
    def filter_names(self) -> list[str]:
        return _names(self.filters)

    @property
    def threshold_of(self) -> dict[str, float]:
        return {n.strip(): float(v) for n, _, v in (i.partition("=") for i in _names(self.thresholds))}


@dataclass
class QualityConfig:
    reference: str = ""          # a folder of trusted images the Gaussian is fitted to (empty: the collection)
    keep_quantile: float = 0.9   # keep this share closest to the reference (by Mahalanobis distance)
    max_distance: float = 0.0    # keep images within this Mahalanobis distance instead (0: use keep_quantile)
    shrinkage: float = -1.0      # covariance shrinkage toward a scaled identity, so few images still give an
                                 # invertible Gaussian (-1: Ledoit-Wolf's estimate)
    batch_size: int = 64         # images per TF-Inception call

    def __post_init__(self):
        if not 0 < self.keep_quantile <= 1 or self.max_distance < 0 or not (self.shrinkage == -1
                                                                             or 0 <= self.shrinkage < 1):
            raise ConfigError("quality.keep_quantile must be in (0, 1], quality.max_distance 0 or more, "
                              "quality.shrinkage -1 (Ledoit-Wolf) or in [0, 1)")
        if self.batch_size < 1:
            raise ConfigError("quality.batch_size must be at least 1")


@dataclass
class CurateConfig:
    run: CurateRunConfig = field(default_factory=CurateRunConfig)
    basic: BasicConfig = field(default_factory=BasicConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


def load_curate(path: str | None = None, overrides: dict[str, object] | None = None) -> CurateConfig:
    """A CurateConfig from an optional TOML file and `--section.key=value` overrides."""
    cfg = load_file(CurateConfig(), path, "curation config") if path else CurateConfig()
    return apply_overrides(cfg, overrides or {})
