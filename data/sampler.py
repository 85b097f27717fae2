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


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (clip index, bucket index), every batch from one bucket (data/buckets.py), for a DataLoader's
    `batch_sampler`.

    Per epoch each bucket's clips are shuffled from (seed, epoch, bucket) and cut into global batches
    (batch_size x num_replicas); the global batches of all buckets are then shuffled together from (seed, epoch).
    Step k of every rank comes from the same global batch, so ranks stay in lock-step on the same shape; rank r
    takes its r-th share. A bucket's last partial global batch waits for a later epoch (another shuffle leaves
    other clips out); a bucket with fewer clips than one global batch never forms one: it is listed in
    `small_buckets`. `set_epoch(epoch, start_batch)` resumes exactly: the order depends only on (seed, epoch).
    """

    def __init__(self, bucket_of: list[int | None], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        global_batch = batch_size * num_replicas
        buckets = sorted({b for b in bucket_of if b is not None})
        self.members = {b: np.array([i for i, x in enumerate(bucket_of) if x == b]) for b in buckets}
        self.small_buckets = {b: len(m) for b, m in self.members.items() if len(m) < global_batch}
        if all(len(m) < global_batch for m in self.members.values()):
            raise ValueError(f"no bucket holds one global batch ({batch_size} x {num_replicas} ranks = "
                             f"{global_batch} clips); clips per bucket: "
                             f"{ {b: len(m) for b, m in self.members.items()} }")

    @property
    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.num_replicas
        return sum(len(m) // global_batch for m in self.members.values())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_batches(self) -> list[tuple[int, np.ndarray]]:
        """(bucket, clip indices of one global batch) for every step of the current epoch, in order."""
        global_batch = self.batch_size * self.num_replicas
        batches = []
        for bucket, members in self.members.items():
            order = np.random.default_rng([self.seed, self.epoch, bucket]).permutation(members)
            batches += [(bucket, order[k:k + global_batch])
                        for k in range(0, len(order) - global_batch + 1, global_batch)]
        return [batches[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(batches))]

    def __iter__(self):
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for bucket, indices in self.epoch_batches()[self.start_batch:]:
            yield [(int(i), bucket) for i in indices[share]]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch
