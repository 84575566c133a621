"""Evaluation: TF-Inception features, FID, KID and reference statistics."""

from genfoundry.eval.features import FeatureExtractorError, InceptionFeatures, inception_path, prepare
from genfoundry.eval.fid import (FeatureStats, evaluate, feature_stats, frechet_distance,
                                 kernel_inception_distance, reference_stats)

__all__ = ["FeatureExtractorError", "FeatureStats", "InceptionFeatures", "evaluate", "feature_stats",
           "frechet_distance", "inception_path", "kernel_inception_distance", "prepare", "reference_stats"]
