"""Which clips each process reads, in which order: reproducible per epoch and resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

T = TypeVar("T")


class _EpochSampler(Sampler[T]):
    """What the samplers below share: this rank's place among `num_replicas`, and the (seed, epoch, start_batch)
    state their order depends on alone, so `set_epoch` resumes exactly."""

    def __init__(self, batch_size: int, num_replicas: int, rank: int, seed: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch


class ShardedEpochSampler(_EpochSampler[int]):
    """Shuffles once per epoch from (seed, epoch), hands each rank an equal share, can start mid-epoch.

    Every rank gets the same number of full batches, so data-parallel ranks stay in lock-step; a
    dataset smaller than one global batch is repeated to fill it. `set_epoch(epoch, start_batch)`
    is what makes resume exact: the order depends only on (seed, epoch), never on process state.
    """

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("the dataset is empty: no clip to sample from")
        super().__init__(batch_size, num_replicas, rank, seed)
        self.num_items = num_items
        self.shuffle = shuffle

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_items // (self.batch_size * self.num_replicas))

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


class BucketBatchSampler(_EpochSampler[list[tuple[int, int]]]):
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
        super().__init__(batch_size, num_replicas, rank, seed)
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


class JointBatchSampler(_EpochSampler[list[tuple[int, bool]]]):
    """Joint image + video training: batches of (record index, image) for a DataLoader's `batch_sampler`, each
    batch all video windows or all still images (JointImageVideoDataset, data/dataset.py).

    Step k of an epoch is an image batch when a uniform draw from (seed, epoch) at position k is below
    `image_share`: the same on every rank (the ranks run the same kind of forward at the same step) and on
    a resumed run. Video steps walk one (seed, epoch) permutation of `video_indices`, image steps another of
    `image_indices`, each cut into global batches (batch_size x num_replicas, rank r takes its r-th share) and
    repeated when an epoch needs more. An epoch is about one pass over the videos: video batches / (1 - share)
    steps (image batches only: one pass over the images). `set_epoch(epoch, start_batch)` resumes exactly.
    """

    def __init__(self, video_indices: list[int], image_indices: list[int], batch_size: int, image_share: float,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(batch_size, num_replicas, rank, seed)
        if not 0.0 <= image_share <= 1.0:
            raise ValueError(f"image_share must be in [0, 1], got {image_share}")
        if image_share < 1.0 and not video_indices:
            raise ValueError("no video clip to fill the video batches (image share < 1)")
        if image_share > 0.0 and not image_indices:
            raise ValueError("no image to fill the image batches (image share > 0)")
        self.video_indices = np.asarray(video_indices, dtype=np.int64)
        self.image_indices = np.asarray(image_indices, dtype=np.int64)
        self.image_share = image_share

    @property
    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.num_replicas
        if self.image_share == 1.0:
            return max(1, len(self.image_indices) // global_batch)
        return max(1, round(max(1, len(self.video_indices) // global_batch) / (1.0 - self.image_share)))

    def image_steps(self) -> np.ndarray:
        """Whether each step of the current epoch is an image batch (the same on every rank)."""
        draws = np.random.default_rng([self.seed, self.epoch, 1]).random(self.batches_per_epoch)
        return draws < self.image_share

    def _order(self, indices: np.ndarray, salt: int, batches: int) -> np.ndarray:
        """`batches` global batches of `indices`, shuffled from (seed, epoch, salt); repeated if too few."""
        order = np.random.default_rng([self.seed, self.epoch, salt]).permutation(indices)
        return np.resize(order, batches * self.batch_size * self.num_replicas)

    def __iter__(self):
        image = self.image_steps()
        videos = self._order(self.video_indices, 2, int((~image).sum())) if len(self.video_indices) else None
        images = self._order(self.image_indices, 3, int(image.sum())) if len(self.image_indices) else None
        global_batch = self.batch_size * self.num_replicas
        # The kth step takes the next global batch of its kind: the number of earlier steps of that kind.
        nth = np.where(image, np.cumsum(image) - 1, np.cumsum(~image) - 1)
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for k in range(self.start_batch, len(image)):
            pool = images if image[k] else videos
            batch = pool[nth[k] * global_batch:(nth[k] + 1) * global_batch][share]
            yield [(int(i), bool(image[k])) for i in batch]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class EpochKey(NamedTuple):
    """A dataset key and the epoch it was sampled in (the datasets of data/dataset.py accept both forms)."""

    epoch: int
    key: Any


class EpochTagged(Sampler):
    """Any sampler or batch sampler above, its keys handed out as EpochKey(sampler.epoch, key).

    A persistent DataLoader worker keeps the dataset copy it was started with, so `dataset.set_epoch` in the
    main process never reaches it; the sampler runs in the main process and knows the epoch, so each key
    carries it to whichever worker builds the item."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch  # read when the DataLoader starts an epoch, after set_epoch
        for item in self.sampler:
            yield [EpochKey(epoch, key) for key in item] if isinstance(item, list) else EpochKey(epoch, item)

    def __len__(self) -> int:
        return len(self.sampler)


def training_loader(dataset: Dataset, sampler: Sampler, collate_fn: Callable, batch_size: int | None = None,
                    num_workers: int = 0, persistent_workers: bool = True, prefetch_factor: int | None = None,
                    pin_memory: bool = False, seed: int = 0, worker_init_fn: Callable | None = None) -> DataLoader:
    """The training DataLoader. `sampler` yields single keys when batch_size is given (it is batched, the last
    partial batch dropped), else whole batches (a batch sampler). With workers: they persist across epochs
    (no restart and re-import per epoch) and each prefetches `prefetch_factor` batches (torch's default 2 when
    None); pin_memory makes host-to-GPU copies asynchronous (`.to(device, non_blocking=True)`)."""
    tagged = EpochTagged(sampler)
    batching = (dict(sampler=tagged, batch_size=batch_size, drop_last=True) if batch_size is not None
                else dict(batch_sampler=tagged))
    workers = {}
    if num_workers > 0:  # torch refuses both options without workers
        workers = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                       worker_init_fn=worker_init_fn)
    return DataLoader(dataset, **batching, collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                      # Workers get their seeds from this generator, not from the global RNG.
                      generator=torch.Generator().manual_seed(seed), **workers)
