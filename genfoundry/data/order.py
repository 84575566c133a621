"""The global sample order: a pure function of (seed, epoch), sliced into global batches, then ranks.

Shard locality: the shard order is shuffled, then samples are shuffled within windows of consecutive
samples of that shard sequence, so a rank reads few shards at a time. Because the order and the
position (epoch, global batch) do not depend on the world size, a run resumed on another number of
ranks continues the same global stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genfoundry import seeding
from genfoundry.errors import ConfigError
from genfoundry.sources import SourceError

FORMAT_VERSION = 1


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(seeding.mix(*words))


def held_out(num_samples: int, count: int) -> np.ndarray:
    """The sorted indices of the `count` samples kept out of training for validation: those whose index
    hashes lowest. It depends on neither the seed nor the world size, so every run of a data set
    validates on the same images, spread evenly over its shards and classes."""
    keys = seeding.hash32(np.arange(num_samples, dtype=np.int64))
    return np.sort(np.argsort(keys, kind="stable")[:count]).astype(np.int64)


def global_order(shard_sizes: list[int], seed: int, epoch: int, window: int = 4096,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """All global sample indices of one epoch, in training order, without those in `exclude` (sorted)."""
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    rng = _rng(seed, epoch, 0x5EED)
    shards = rng.permutation(len(shard_sizes))
    stream = np.concatenate([np.arange(starts[s], starts[s] + shard_sizes[s]) for s in shards]) if len(shards) else \
        np.empty(0, np.int64)
    for lo in range(0, len(stream), window):
        rng.shuffle(stream[lo:lo + window])
    if exclude is not None and len(exclude):
        stream = stream[~np.isin(stream, exclude, assume_unique=True)]
    return stream


def sample_seed(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: the same on any rank, worker or batch size."""
    return _rng(seed, epoch, index, 0xA06)


@dataclass
class GlobalBatches:
    """Global batches of `global_batch_size` over an epoch order, cut into `world_size x accumulation`
    equal chunks: micro-step j of rank r takes chunk j * world_size + r (with no accumulation, rank r
    takes the r-th contiguous slice).

    The partial global batch at the end of an epoch is dropped, so every rank gets the same number of
    batches per epoch and no rank waits for one that never comes.
    """

    shard_sizes: list[int]
    global_batch_size: int
    seed: int = 0
    window: int = 4096
    exclude: np.ndarray | None = None  # sorted sample indices never trained on (the validation hold-out)

    def __post_init__(self):
        if self.batches_per_epoch == 0:
            held = f" ({len(self.exclude)} more are held out for validation)" if self.num_excluded else ""
            raise SourceError(f"the dataset has {self.num_samples} training samples{held}, fewer than one global "
                              f"batch of {self.global_batch_size}; lower --train.global_batch_size")

    @property
    def num_excluded(self) -> int:
        return 0 if self.exclude is None else len(self.exclude)

    @property
    def num_samples(self) -> int:
        """Samples trained on per epoch (before the partial last batch is dropped)."""
        return sum(self.shard_sizes) - self.num_excluded

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def order(self, epoch: int) -> np.ndarray:
        return global_order(self.shard_sizes, self.seed, epoch, self.window, self.exclude)

    def local_batch_size(self, world_size: int, accumulation: int = 1) -> int:
        """Images in one micro-batch of one rank."""
        chunks = world_size * accumulation
        if self.global_batch_size % chunks:
            raise ConfigError(f"global batch {self.global_batch_size} does not split into {world_size} ranks x "
                             f"{accumulation} micro-batches; use a multiple of {chunks}")
        return self.global_batch_size // chunks

    def batch(self, order: np.ndarray, batch: int, rank: int = 0, world_size: int = 1, micro: int = 0,
              accumulation: int = 1) -> np.ndarray:
        """Global sample indices of `rank`'s micro-batch `micro` of global batch number `batch`."""
        local = self.local_batch_size(world_size, accumulation)
        start = batch * self.global_batch_size + chunk_index(rank, world_size, micro) * local
        return order[start:start + local]


def chunk_index(rank: int, world_size: int, micro: int) -> int:
    """Which chunk of a global batch a rank trains on at a micro-step."""
    return micro * world_size + rank
