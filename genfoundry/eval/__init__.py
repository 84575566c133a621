"""Evaluation: TF-Inception features, FID, KID and reference statistics."""

from genfoundry.features import (RESIZES, FeatureExtractorError, InceptionFeatures, inception_path,
                                 network_sha256, prepare)
from genfoundry.eval.fid import (FeatureStats, cached_stats, evaluate, feature_stats, frechet_distance,
                                 kernel_inception_distance, reference_stats, stats_of)
from genfoundry.eval.reference import Reference, resolve

__all__ = ["RESIZES", "FeatureExtractorError", "FeatureStats", "InceptionFeatures", "Reference", "cached_stats",
           "evaluate", "feature_stats", "frechet_distance", "inception_path", "kernel_inception_distance",
           "network_sha256", "prepare", "reference_stats", "resolve", "stats_of"]
