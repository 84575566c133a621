"""Batches for training: a resumable global sample order over an in-memory image set."""

from genfoundry.data.memory import InMemoryLoader, epoch_permutation

__all__ = ["InMemoryLoader", "epoch_permutation"]
