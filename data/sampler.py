"""Which clips each process reads, in which order: reproducible per epoch and resumable mid-epoch."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[int]):
    """Shuffles once per epoch from (seed, epoch), hands each rank an equal share, can start mid-epoch.

    Every rank gets the same number of full batches, so data-parallel ranks stay in lock-step; a
    dataset smaller than one global batch is repeated to fill it. `set_epoch(epoch, start_batch)`
    is what makes resume exact: the order depends only on (seed, epoch), never on process state.
    """

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("the dataset is empty: no clip to sample from")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_items // (self.batch_size * self.num_replicas))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_indices(self) -> np.ndarray:
        """This rank's indices for the whole current epoch."""
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        needed = self.batches_per_epoch * self.batch_size * self.num_replicas
        order = np.resize(order, needed)  # repeats the order when the dataset is tiny
        return order[self.rank :: self.num_replicas]

    def __iter__(self):
        yield from self.epoch_indices()[self.start_batch * self.batch_size :].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
