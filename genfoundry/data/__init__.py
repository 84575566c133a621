"""Batches for training: the DataPipeline over shards, its transforms, the resumable global order,
and the in-memory loader for small datasets."""

from genfoundry.data.loader import Loader
from genfoundry.data.memory import InMemoryLoader, epoch_permutation
from genfoundry.data.pipeline import Batch, DataPipeline, ShardLoader
from genfoundry.data.transforms import (CenterCrop, ColorJitter, Lambda, Normalize, RandomCrop,
                                        RandomHorizontalFlip, RandomResizedCrop, Resize)

__all__ = ["Batch", "CenterCrop", "ColorJitter", "DataPipeline", "InMemoryLoader", "Lambda", "Loader", "Normalize",
           "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop", "Resize", "ShardLoader",
           "epoch_permutation"]
