"""Frame / resolution buckets on real tiny videos: every clip goes to the largest bucket it fills or is listed
with the reason, every batch has one bucket's shape, ranks stay on one bucket per step, and resume is exact."""

import json
import os
import signal

import numpy as np
import pytest
import task_runs
import torch
from tiny import tiny_config
from torch.utils.data import DataLoader

from data.buckets import (
    Bucket,
    BucketedClipDataset,
    collate_bucketed,
    crop_resize,
    parse_buckets,
    plan_buckets,
)
from data.manifest import ClipRecord, write_manifest
from data.sampler import BucketBatchSampler
from facevid.config import load_config
from facevid.schema import ConfigError
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer

BUCKETS = parse_buckets(["8x32x32", "16x32x32", "8x32x48", "16x16x24"])
SQUARE_LONG, SQUARE, LANDSCAPE, PORTRAIT_SMALL = BUCKETS


@pytest.fixture
def clips(make_video, tmp_path):
    """(records, expected bucket or None per record)."""
    specs = [  # name, frames, height, width, expected bucket
        *[(f"square{i}", 20, 32, 32, SQUARE) for i in range(5)],  # fills all but 8x32x48: the largest wins
        *[(f"wide{i}", 10, 32, 48, LANDSCAPE) for i in range(2)],  # too short for 16; a square crop drops 33%
        ("short", 6, 32, 32, None),
        ("tiny", 20, 16, 16, None),
    ]
    records, expected = [], []
    for name, frames, height, width, bucket in specs:
        path, _ = make_video(f"clips/{name}.mp4", num_frames=frames, height=height, width=width)
        records.append(ClipRecord(clip_id=name, video=str(path), captions=[f"caption of {name}"]))
        expected.append(bucket)
    broken = tmp_path / "clips" / "broken.mp4"
    broken.write_bytes(b"not a video")
    records.append(ClipRecord(clip_id="broken", video=str(broken), captions=["x"]))
    expected.append(None)
    return records, expected


def test_clips_go_to_the_largest_bucket_they_fill_or_are_listed_with_the_reason(clips):
    records, expected = clips
    plan = plan_buckets(records, BUCKETS, max_crop=0.25)
    assert [None if b is None else BUCKETS[b] for b in plan.bucket_of] == expected
    reasons = {item.reason.split("'")[1]: item.reason for item in plan.unfit}
    assert set(reasons) == {"short", "tiny", "broken"}
    assert "16x32x32: too short: 6 usable frames" in reasons["short"]
    assert "8x32x32: too small: 16x16 gives a 16x16 crop, needs 32x32" in reasons["tiny"]
    assert "unreadable" in reasons["broken"]
    report = plan.report(global_batch=4)
    assert report["clips_per_bucket"] == {"8x32x32": 0, "16x32x32": 5, "8x32x48": 2, "16x16x24": 0}
    assert report["buckets_smaller_than_global_batch"] == {"8x32x48": 2} and report["clips_in_small_buckets"] == 2
    assert report["unfit"] == 3 and len(report["unfit_clips"]) == 3
    # With no crop limit the wide clips also fill 8x32x32; 8x32x48 is larger, so they stay there.
    assert plan_buckets(records[5:7], BUCKETS, max_crop=0.99).bucket_of == [2, 2]
    # The largest bucket wins even over one that crops less: the square clips lose nothing in either.
    assert plan_buckets(records[:1], BUCKETS[:2]).bucket_of == [1]


def test_every_batch_has_its_buckets_shape_with_workers(clips):
    records, _ = clips
    plan = plan_buckets(records, BUCKETS)
    sampler = BucketBatchSampler(plan.bucket_of, batch_size=2, seed=3)
    assert sampler.small_buckets == {} and len(sampler) == 5 // 2 + 2 // 2
    dataset = BucketedClipDataset(records, plan, seed=3)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bucketed, num_workers=2)
    shapes = []
    for batch in loader:
        bucket = next(b for b in BUCKETS if b.name == batch["bucket"])
        assert batch["pixel_values"].shape == (2, 3, bucket.frames, bucket.height, bucket.width)
        assert all(plan.bucket_of[i] == BUCKETS.index(bucket) for i in batch["index"])
        shapes.append(bucket.name)
    assert sorted(shapes) == ["16x32x32", "16x32x32", "8x32x48"]


def test_resume_mid_epoch_gives_the_same_batches(clips):
    records, _ = clips
    plan = plan_buckets(records, BUCKETS)
    dataset = BucketedClipDataset(records, plan, seed=5, flip=True)

    def batches(epoch, start_batch):
        sampler = BucketBatchSampler(plan.bucket_of, batch_size=2, seed=5)
        sampler.set_epoch(epoch, start_batch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bucketed, num_workers=2)
        return [(b["clip_id"], b["pixel_values"]) for b in loader]

    full = batches(1, 0)
    resumed = batches(1, 1)
    assert len(resumed) == len(full) - 1
    for (ids, pixels), (ids_again, pixels_again) in zip(full[1:], resumed):
        assert ids == ids_again and torch.equal(pixels, pixels_again)
    assert [ids for ids, _ in batches(2, 0)] != [ids for ids, _ in full]  # another epoch, another order


def test_ranks_share_each_global_batch_of_one_bucket():
    bucket_of = [0] * 13 + [1] * 9 + [None] * 3 + [2] * 3
    samplers = [BucketBatchSampler(bucket_of, batch_size=2, num_replicas=2, rank=r, seed=0) for r in range(2)]
    assert samplers[0].small_buckets == {2: 3}  # 3 clips < 2 x 2: never a batch, and named
    assert len(samplers[0]) == 13 // 4 + 9 // 4
    for epoch in range(3):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        steps = list(zip(*samplers))
        seen = []
        for rank0, rank1 in steps:
            buckets = {b for _, b in rank0 + rank1}
            assert len(buckets) == 1 and all(bucket_of[i] == b for i, b in rank0 + rank1)
            seen += [i for i, _ in rank0 + rank1]
        assert len(seen) == len(set(seen)) == 4 * len(steps)  # no clip twice within an epoch
    with pytest.raises(ValueError, match="no bucket holds one global batch"):
        BucketBatchSampler([0, 0, 1], batch_size=2, num_replicas=2)


def test_crop_resize_and_bucket_specs():
    frames = np.zeros((1, 20, 40, 3), np.uint8)
    frames[:, :, 10:30] = 255  # a bright centre band: a 1:1 crop keeps exactly it
    square = crop_resize(frames, 10, 10)
    assert square.shape == (1, 10, 10, 3) and square.min() == 255
    assert crop_resize(frames, 20, 40).shape == (1, 20, 40, 3)
    assert parse_buckets(["16x256x448"], multiple_of=64) == [Bucket(16, 256, 448)]
    for bad, message in (("16x256", "FRAMESxHEIGHTxWIDTH"), ("16x250x448", "multiples of 8"),
                         ("0x8x8", ">= 1")):
        with pytest.raises(ValueError, match=message):
            parse_buckets([bad], multiple_of=8)


def test_a_batch_mixing_buckets_is_refused():
    items = [{"pixel_values": torch.zeros(3, 1, 2, 2), "caption": "", "clip_id": "a", "index": 0, "skipped": [],
              "bucket": name} for name in ("1x2x2", "1x4x4")]
    with pytest.raises(ValueError, match="mixes buckets"):
        collate_bucketed(items)


@pytest.fixture
def bucket_manifest(make_video, tmp_path):
    """4 square 10-frame clips (-> 8x16x16), 2 wide 6-frame ones (-> 4x16x24), 1 too short for any bucket."""
    records = []
    for name, frames, height, width in ([(f"sq{i}", 10, 16, 16) for i in range(4)]
                                        + [(f"wide{i}", 6, 16, 24) for i in range(2)] + [("short", 3, 16, 16)]):
        path, _ = make_video(f"clips/{name}.mp4", num_frames=frames, height=height, width=width)
        records.append(ClipRecord(clip_id=name, video=str(path), captions=[f"a person {name}"]))
    return write_manifest(tmp_path / "manifest.jsonl", records)


class Recording(TextToVideoStage):
    """Records each micro-batch's shape; sends its own process SIGTERM at micro-batch `stop_at` (preemption)."""

    def __init__(self, cfg, stop_at: int = 0):
        super().__init__(cfg)
        self.shapes, self.stop_at = [], stop_at

    def compute_loss(self, model, batch, generator):
        self.shapes.append(tuple(batch["pixel_values"].shape))
        if len(self.shapes) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_loss(model, batch, generator)


def bucket_run(manifest, run, tmp_path_factory, *overrides):
    return tiny_config(manifest, run, "data.buckets=[4x16x16,4x16x24,8x16x16]", "sample.num_inference_steps=2",
                       *overrides, vae=task_runs.random_vae(tmp_path_factory))


def test_training_run_trains_every_bucket_shape(bucket_manifest, tmp_path, tmp_path_factory):
    """data.buckets through the production Trainer: batches of both shapes reach the model; buckets.json says
    where every clip went."""
    cfg = bucket_run(bucket_manifest, tmp_path / "run", tmp_path_factory, "train.max_steps=3")
    stage = Recording(cfg)
    Trainer(cfg, stage).fit()
    assert sorted(stage.shapes) == [(2, 3, 4, 16, 24), (2, 3, 8, 16, 16), (2, 3, 8, 16, 16)]
    report = json.loads((tmp_path / "run" / "buckets.json").read_text())
    assert report["clips_per_bucket"] == {"4x16x16": 0, "4x16x24": 2, "8x16x16": 4}
    assert report["steps_per_epoch"] == 3 and report["unfit"] == 1 and "'short'" in report["unfit_clips"][0]["reason"]


def test_bucketed_run_resumes_exactly(bucket_manifest, tmp_path, tmp_path_factory):
    """5 steps == 2 steps, SIGTERM, resume, 3 more (crossing the 3-step epoch): same shapes, same losses."""
    common = ["train.max_steps=5", "data.num_workers=1"]
    straight_cfg = bucket_run(bucket_manifest, tmp_path / "straight", tmp_path_factory, *common)
    straight = Recording(straight_cfg)
    Trainer(straight_cfg, straight).fit()
    first_cfg = bucket_run(bucket_manifest, tmp_path / "resumed", tmp_path_factory, *common)
    first = Recording(first_cfg, stop_at=2)
    Trainer(first_cfg, first).fit()
    second_cfg = bucket_run(bucket_manifest, tmp_path / "resumed", tmp_path_factory, *common, "resume=latest")
    second = Recording(second_cfg)
    Trainer(second_cfg, second).fit()
    assert first.shapes + second.shapes == straight.shapes
    assert len(set(straight.shapes)) == 2

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "straight")) == 5


def test_bucket_config_is_validated(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    base = [f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "stage=t2v", f"vae.pretrained={tmp_path}"]
    cfg = load_config(None, [*base, "data.buckets=[8x64x64,8x64x96]"])
    assert list(cfg.data.buckets) == ["8x64x64", "8x64x96"]
    for override, message in (("data.buckets=[8x64x63]", "multiples of 2"), ("data.buckets=[8x64]", "FRAMES"),
                              ("data.buckets=[8x64x64,8x64x64]", "twice")):
        with pytest.raises(ConfigError, match=f"data.buckets.*{message}"):
            load_config(None, [*base, override])
    with pytest.raises(ConfigError, match="data.buckets.*task t2v or uncond"):
        load_config(None, [*base, "data.buckets=[8x64x64]", "task=i2v"])
    with pytest.raises(ConfigError, match="data.bucket_max_crop"):
        load_config(None, [*base, "data.buckets=[8x64x64]", "data.bucket_max_crop=1.5"])
