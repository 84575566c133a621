"""Networks only, and a plain registry of presets. Knows nothing of data, training or parallelism."""

from genfoundry.models.dit import MODELS, DiT, DiTArch, build_model

__all__ = ["MODELS", "DiT", "DiTArch", "build_model"]
