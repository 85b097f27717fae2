"""The training data of a run, from the config: the manifest read (skips reported), held-out clips for
val/loss, the dataset for the run's mode (clips on the fly, the latent cache, joint image + video batches, or
buckets), its sampler and the DataLoader.

Exact resume rests on two things made here: the sampler's order depends only on (seed, epoch) and skips the
batches a resumed epoch already consumed (data/sampler.py), and each item's random choices depend only on
(seed, epoch, index) (data/dataset.py).
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.buckets import bucketed_training_data, collate_bucketed, parse_buckets, saved_or_new_plan
from data.cache import LatentCache, text_key
from data.dataset import (
    CachedClipDataset,
    CachedJointDataset,
    JointImageVideoDataset,
    VideoClipDataset,
    collate_clips,
    collate_joint,
)
from data.manifest import SkippedItem, append_skip_report, read_manifest
from data.sampler import JointBatchSampler, ShardedEpochSampler, training_loader
from facevid.cache_builder import build_cache, check_cache
from facevid.config import save_config
from facevid.engine import on_main_process
from facevid.schema import ConfigError, RunConfig
from facevid.stages.common import training_fps
from facevid.validation import validate_clips

logger = logging.getLogger("facevid")


@dataclass
class TrainingData:
    dataset: torch.utils.data.Dataset
    sampler: object  # ShardedEpochSampler or a batch sampler; has set_epoch(epoch, start_batch)
    loader: DataLoader
    heldout: torch.utils.data.Dataset | None  # clips kept out of training for val/loss, or None
    manifest_skipped: list[SkippedItem]


def _ignore_stop_signals_in_worker(_worker_id: int) -> None:
    # Ctrl-C and SIGTERM reach the whole process group; only the main process decides when to stop
    # (after saving a checkpoint). A worker killed by the signal would crash the run instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_training_data(cfg: RunConfig, accelerator, run_dir: Path) -> TrainingData:
    acc = accelerator
    manifest = Path(cfg.data.manifest)
    records, skipped = read_manifest(manifest)
    _resolve_playback_fps(cfg, records, acc, run_dir)
    if skipped and acc.is_main_process:
        logger.warning("%d manifest entries skipped:\n  %s", len(skipped), "\n  ".join(map(str, skipped[:20])))
        append_skip_report(run_dir / "skipped_clips.jsonl", skipped, kind="manifest")
    if not records:
        raise RuntimeError(f"no usable clip in {manifest} ({len(skipped)} skipped)")
    images = sum(r.is_image for r in records)
    if images and not cfg.data.image_batch_share:
        logger.warning("%d still image(s) in %s are left out: set data.image_batch_share > 0 to train on them "
                       "in image batches", images, manifest)
        records = [r for r in records if not r.is_image]
    logger.info("dataset: %d clips from %s", len(records), manifest)
    heldout = None  # at data.resolution, also with buckets
    if cfg.train.val_loss_clips:
        if cfg.train.val_loss_clips >= len(records):
            raise ConfigError(f"config key 'train.val_loss_clips' = {cfg.train.val_loss_clips} is invalid: "
                              f"{manifest} has only {len(records)} usable clips; hold out fewer")
        records, held = records[: -cfg.train.val_loss_clips], records[-cfg.train.val_loss_clips:]
        heldout = _dataset(cfg, acc, run_dir, held)
        logger.info("val/loss: the manifest's last %d clips are held out of training", len(held))
    batch_size, collate = None, collate_clips  # batch_size None: the sampler yields whole batches
    if cfg.data.image_batch_share:
        dataset, sampler = _joint_data(cfg, acc, run_dir, records)
        collate = collate_joint
    elif cfg.data.buckets:
        dataset, sampler = _bucketed_data(cfg, acc, run_dir, records)
        collate = collate_bucketed
    else:
        dataset = _dataset(cfg, acc, run_dir, records)
        batch_size = cfg.train.batch_size
        sampler = ShardedEpochSampler(len(dataset), cfg.train.batch_size, num_replicas=acc.num_processes,
                                      rank=acc.process_index, seed=cfg.seed)
    d = cfg.data
    loader = training_loader(
        dataset, sampler, collate, batch_size, num_workers=d.num_workers,
        persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor,
        pin_memory=acc.device.type == "cuda" if d.pin_memory is None else d.pin_memory,
        seed=cfg.seed, worker_init_fn=_ignore_stop_signals_in_worker,
    )
    return TrainingData(dataset, sampler, loader, heldout, skipped)


def _dataset(cfg: RunConfig, acc, run_dir: Path, records):
    if cfg.data.cache != "none":
        return _cached_dataset(cfg, acc, run_dir, records)
    # A window longer than every clip would fail at the first batch; rank 0 reads the headers, all ranks fail.
    on_main_process(acc, lambda: validate_clips(cfg, records))
    return VideoClipDataset(
        records, num_frames=cfg.data.num_frames, frame_stride=cfg.data.frame_stride,
        resolution=cfg.data.resolution, seed=cfg.seed, target_fps=cfg.data.target_fps, flip=cfg.data.flip,
    )


def _joint_data(cfg: RunConfig, acc, run_dir: Path, records):
    """data.image_batch_share: image and video batches (data/sampler.py JointBatchSampler); image batches
    take the still images, or random clip frames when the manifest has none."""
    if cfg.data.cache == "none":
        dataset = JointImageVideoDataset(
            records, num_frames=cfg.data.num_frames, frame_stride=cfg.data.frame_stride,
            resolution=cfg.data.resolution, seed=cfg.seed, target_fps=cfg.data.target_fps, flip=cfg.data.flip,
        )
    else:  # still images are cached as 1-frame windows (facevid/cache_builder.py)
        dataset = _cached_dataset(cfg, acc, run_dir, records, CachedJointDataset)
    records = dataset.records
    videos = [i for i, r in enumerate(records) if not r.is_image]
    images = [i for i, r in enumerate(records) if r.is_image] or videos
    share = cfg.data.image_batch_share
    if share < 1 and not videos:
        raise ConfigError(f"config key 'data.image_batch_share' = {share} is invalid: {cfg.data.manifest} holds "
                          "still images only, so there is no video batch to make; set it to 1.0")
    sampler = JointBatchSampler(videos, images, cfg.train.batch_size, share, num_replicas=acc.num_processes,
                                rank=acc.process_index, seed=cfg.seed)
    logger.info("joint image + video training: %d video clip(s), %d image(s)%s, %.0f%% image batches, %d steps "
                "per epoch", len(videos), len(records) - len(videos),
                "" if len(records) > len(videos) else " (image batches use clip frames)", 100 * share,
                sampler.batches_per_epoch)
    return dataset, sampler


def _bucketed_data(cfg: RunConfig, acc, run_dir: Path, records):
    """data.buckets: each clip at the largest bucket it fills; buckets.json says where every clip went."""
    d = cfg.data
    # Rank 0 probes the clips (or reuses the plan this run saved before) and shares the plan.
    plan, reused = on_main_process(acc, lambda: saved_or_new_plan(
        run_dir / "buckets.json", records, parse_buckets(list(d.buckets)), d.frame_stride, d.target_fps,
        d.bucket_max_crop))
    dataset, sampler, report = bucketed_training_data(
        records, list(cfg.data.buckets), cfg.train.batch_size, acc.num_processes, acc.process_index, cfg.seed,
        cfg.data.frame_stride, cfg.data.target_fps, cfg.data.bucket_max_crop, cfg.data.flip, plan=plan)
    if reused:
        logger.info("buckets: plan reused from %s (same clips and settings): no clip probed", run_dir / "buckets.json")
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "buckets.json").write_text(json.dumps(report, indent=2) + "\n")
        logger.info("buckets: clips per bucket %s, %d steps per epoch", report["clips_per_bucket"],
                    report["steps_per_epoch"])
        if report["unfit"]:
            logger.warning("%d clip(s) fit no bucket and are left out (all listed in buckets.json):\n  %s",
                           report["unfit"], "\n  ".join(f"{u['source']}: {u['reason']}"
                                                       for u in report["unfit_clips"][:20]))
        if report["buckets_smaller_than_global_batch"]:
            logger.warning("buckets with fewer clips than one global batch (%d) never form a batch; their "
                           "%d clip(s) are not trained on: %s", report["global_batch"],
                           report["clips_in_small_buckets"], report["buckets_smaller_than_global_batch"])
    return dataset, sampler


def _resolve_playback_fps(cfg: RunConfig, records, acc, run_dir: Path) -> None:
    """sample.fps null = the fps the model is trained at; config.yaml then records it for sample.py."""
    if cfg.sample.fps is not None:
        return
    cfg.sample.fps = training_fps(cfg, records)
    logger.info("videos play at %.4g fps, the rate the model is trained at (sample.fps)", cfg.sample.fps)
    if acc.is_main_process:
        save_config(cfg, run_dir / "config.yaml")


def _cached_dataset(cfg: RunConfig, acc, run_dir: Path, records, dataset_class=CachedClipDataset):
    if cfg.data.cache == "auto":
        build_cache(cfg, acc)  # encodes only what is missing; every rank takes a share
    check_cache(cfg)
    encoder, max_length = cfg.text_encoder.pretrained, cfg.text_encoder.max_length
    dataset = dataset_class(records, LatentCache(cfg.data.cache_dir),
                            partial(text_key, encoder_id=encoder, max_length=max_length),
                            seed=cfg.seed, flip=cfg.data.flip)
    logger.info("training from the latent cache in %s (%d clips)", cfg.data.cache_dir, len(dataset))
    if dataset.missing and acc.is_main_process:
        logger.warning("%d clip(s) of the manifest are not in the cache and are left out:\n  %s",
                       len(dataset.missing), "\n  ".join(map(str, dataset.missing[:20])))
        append_skip_report(run_dir / "skipped_clips.jsonl", dataset.missing, kind="cache")
    return dataset
