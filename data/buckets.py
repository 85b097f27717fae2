"""Frame / resolution buckets: train on clips of several shapes (non-square H x W, several frame counts).

    buckets = parse_buckets(["16x256x256", "16x256x448", "24x256x256"])   # frames x height x width, in pixels
    plan = plan_buckets(records, buckets, frame_stride=1, target_fps=6.25)
    sampler = BucketBatchSampler(plan.bucket_of, batch_size, num_replicas, rank, seed)   # data/sampler.py
    dataset = BucketedClipDataset(records, plan, seed=seed)
    DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bucketed, num_workers=...)

Every clip goes to the LARGEST bucket (frames x height x width) it fills:
- enough usable frames for the bucket's frame count at the run's stride / target fps (the dataset's window rule);
- no upscaling: after center-cropping the clip to the bucket's aspect ratio, the crop is at least H x W;
- the crop keeps at least 1 - max_crop of the frame (default: drops at most 25%), so a 16:9 clip does not land
  in a square bucket by losing almost half of each frame.
A clip that fills no bucket is listed in `plan.unfit` with the reason for each bucket (or why it could not be
read). Each batch comes from one bucket (data/sampler.py); a bucket with fewer clips than one global batch can
never form a batch: `plan.report(global_batch)` and the sampler name it and the clips it strands.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.dataset import _ClipDataset, collate_clips, window_range
from data.manifest import ClipRecord, SkippedItem
from data.video import VideoDecodeError, VideoInfo, frames_to_tensor, probe_video, read_frames


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width


def parse_buckets(specs: list[str], multiple_of: int = 1) -> list[Bucket]:
    """"FxHxW" strings -> buckets; H and W must be multiples of `multiple_of` (VAE factor x UNet downsampling)."""
    buckets = []
    for spec in specs:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", str(spec))
        if not match:
            raise ValueError(f"bucket {spec!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 16x256x448")
        bucket = Bucket(*(int(v) for v in match.groups()))
        if min(bucket.frames, bucket.height, bucket.width) < 1:
            raise ValueError(f"bucket {spec!r}: every dimension must be >= 1")
        if bucket.height % multiple_of or bucket.width % multiple_of:
            raise ValueError(f"bucket {spec!r}: height and width must be multiples of {multiple_of}")
        if bucket in buckets:
            raise ValueError(f"bucket {spec!r} is listed twice")
        buckets.append(bucket)
    if not buckets:
        raise ValueError("no bucket given")
    return buckets


def aspect_crop(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """(crop height, crop width): the largest centered crop of a height x width frame with the bucket's aspect."""
    if width * bucket.height > height * bucket.width:  # frame wider than the bucket: trim the sides
        return height, round(height * bucket.width / bucket.height)
    return round(width * bucket.height / bucket.width), width


def crop_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> center-cropped to height:width, resized (antialiased) to height x width."""
    _, src_h, src_w, _ = frames.shape
    crop_h, crop_w = aspect_crop(src_h, src_w, Bucket(1, height, width))
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    frames = frames[:, top:top + crop_h, left:left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def why_not(record: ClipRecord, info: VideoInfo, bucket: Bucket, frame_stride: int, target_fps: float | None,
            max_crop: float) -> str | None:
    """Why the clip does not fill `bucket`; None when it does."""
    try:
        window_range(record, info, bucket.frames, frame_stride, target_fps)
    except VideoDecodeError as err:
        return err.reason
    crop_h, crop_w = aspect_crop(info.height, info.width, bucket)
    if crop_h < bucket.height or crop_w < bucket.width:
        return f"too small: {info.width}x{info.height} gives a {crop_w}x{crop_h} crop, needs {bucket.width}x" \
               f"{bucket.height} (no upscaling)"
    lost = 1 - crop_h * crop_w / (info.height * info.width)
    if lost > max_crop:
        return f"aspect: cropping {info.width}x{info.height} to {bucket.width}:{bucket.height} drops {lost:.0%} " \
               f"of each frame (max_crop {max_crop:.0%})"
    return None


@dataclass
class BucketPlan:
    buckets: list[Bucket]
    bucket_of: list[int | None]  # per record: its bucket's index, None when it fits none
    unfit: list[SkippedItem]

    def members(self, bucket: int) -> list[int]:
        return [i for i, b in enumerate(self.bucket_of) if b == bucket]

    def report(self, global_batch: int) -> dict:
        """Clips per bucket, buckets too small for one global batch (and the clips they strand), unfit clips."""
        counts = {b.name: len(self.members(i)) for i, b in enumerate(self.buckets)}
        small = {name: n for name, n in counts.items() if 0 < n < global_batch}
        return {
            "clips": len(self.bucket_of), "clips_per_bucket": counts,
            "buckets_smaller_than_global_batch": small, "clips_in_small_buckets": sum(small.values()),
            "global_batch": global_batch, "unfit": len(self.unfit),
            "unfit_clips": [{"source": s.source, "reason": s.reason} for s in self.unfit],
        }


def plan_buckets(records: list[ClipRecord], buckets: list[Bucket], frame_stride: int = 1,
                 target_fps: float | None = None, max_crop: float = 0.25,
                 probe: Callable[[str], VideoInfo] = probe_video) -> BucketPlan:
    """Assign every record to the largest bucket it fills (ties: the one that crops less)."""
    if not 0 <= max_crop < 1:
        raise ValueError(f"max_crop must be in [0, 1), got {max_crop}")
    bucket_of: list[int | None] = []
    unfit = []
    for record in records:
        try:
            info = probe(record.video)
        except (VideoDecodeError, OSError) as err:
            reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
            bucket_of.append(None)
            unfit.append(SkippedItem(record.video, f"clip {record.clip_id!r}: unreadable: {reason}"))
            continue
        reasons = {i: why_not(record, info, b, frame_stride, target_fps, max_crop) for i, b in enumerate(buckets)}
        fitting = [i for i, reason in reasons.items() if reason is None]
        if not fitting:
            listed = "; ".join(f"{buckets[i].name}: {reason}" for i, reason in reasons.items())
            bucket_of.append(None)
            unfit.append(SkippedItem(record.video, f"clip {record.clip_id!r} fits no bucket: {listed}"))
            continue
        kept = {i: np.prod(aspect_crop(info.height, info.width, buckets[i])) for i in fitting}
        bucket_of.append(max(fitting, key=lambda i: (buckets[i].size, kept[i])))
    return BucketPlan(list(buckets), bucket_of, unfit)


def plan_key(records: list[ClipRecord], buckets: list[Bucket], frame_stride: int, target_fps: float | None,
             max_crop: float) -> str:
    """A digest of everything a plan depends on but the files' contents: the buckets, the window rule, and each
    clip's path and usable range. Equal keys = the plan can be reused (clips are not rewritten in place)."""
    described = {"buckets": [b.name for b in buckets], "frame_stride": frame_stride, "target_fps": target_fps,
                 "max_crop": max_crop,
                 "clips": [[r.video, r.fps, r.frame_range, r.time_range] for r in records]}
    return hashlib.sha256(json.dumps(described, default=list).encode()).hexdigest()


def saved_or_new_plan(report_path: Path, records: list[ClipRecord], buckets: list[Bucket], frame_stride: int = 1,
                      target_fps: float | None = None, max_crop: float = 0.25,
                      probe: Callable[[str], VideoInfo] = probe_video) -> tuple[BucketPlan, bool]:
    """(plan, reused): the plan saved in a run's buckets.json (`report` below) when it was made for the same
    clips and settings, so a resumed run probes nothing; else plan_buckets (one header read per clip)."""
    key = plan_key(records, buckets, frame_stride, target_fps, max_crop)
    try:
        saved = json.loads(Path(report_path).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: plan afresh
        saved = {}
    if saved.get("plan_key") == key and len(saved.get("bucket_of", [])) == len(records):
        unfit = [SkippedItem(u["source"], u["reason"]) for u in saved["unfit_clips"]]
        return BucketPlan(list(buckets), saved["bucket_of"], unfit), True
    return plan_buckets(records, buckets, frame_stride, target_fps, max_crop, probe), False


class BucketedClipDataset(_ClipDataset):
    """Items are keyed (record index, bucket index), as BucketBatchSampler yields them: a random window of the
    bucket's frame count, center-cropped to its aspect and resized to its H x W. A clip that fails to load is
    replaced by the next clip of the SAME bucket, so every batch keeps one shape."""

    def __init__(self, records: list[ClipRecord], plan: BucketPlan, frame_stride: int = 1,
                 target_fps: float | None = None, seed: int = 0, max_substitutions: int = 16, flip: bool = False):
        super().__init__(records, seed, flip, max_substitutions)
        if len(plan.bucket_of) != len(self.records):
            raise ValueError(f"the bucket plan covers {len(plan.bucket_of)} clips, the dataset has {len(records)}")
        self.plan = plan
        self.frame_stride = frame_stride
        self.target_fps = target_fps
        self._members = [plan.members(b) for b in range(len(plan.buckets))]
        self._position = {index: position for members in self._members for position, index in enumerate(members)}
        self._probes: dict[str, VideoInfo] = {}

    def _item(self, key: tuple[int, int], epoch: int) -> dict:
        index, bucket_index = (int(k) for k in key)
        if self.plan.bucket_of[index] != bucket_index:
            raise ValueError(f"clip {index} belongs to bucket {self.plan.bucket_of[index]}, not {bucket_index}")
        bucket, members = self.plan.buckets[bucket_index], self._members[bucket_index]
        rng = np.random.default_rng([self.seed, epoch, index])
        position = self._position[index]
        skipped: list[SkippedItem] = []
        for attempt in range(min(self.max_substitutions + 1, len(members))):
            used = members[(position + attempt) % len(members)]
            record = self.records[used]
            try:
                item = self._load_bucket(record, rng, bucket)
            except (VideoDecodeError, OSError) as err:
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                skipped.append(SkippedItem(record.video, reason))
                continue
            return {**item, "clip_id": record.clip_id, "index": used, "bucket": bucket.name, "skipped": skipped}
        tried = "\n  ".join(str(item) for item in skipped)
        raise RuntimeError(f"item {index} (bucket {bucket.name}): no usable clip among {len(skipped)} tried:\n  {tried}")

    def _load_bucket(self, record: ClipRecord, rng: np.random.Generator, bucket: Bucket) -> dict:
        if record.video not in self._probes:
            self._probes[record.video] = probe_video(record.video)
        starts, stride = window_range(record, self._probes[record.video], bucket.frames, self.frame_stride,
                                      self.target_fps)
        start = starts[rng.integers(len(starts))]
        frames = read_frames(record.video, range(start, start + bucket.frames * stride, stride))
        frames = crop_resize(frames, bucket.height, bucket.width)
        caption, flip = self._pick_caption_and_flip(record, rng)
        if flip:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        return {"pixel_values": frames_to_tensor(frames), "caption": caption}


def bucketed_training_data(records: list[ClipRecord], specs: list[str], batch_size: int, num_replicas: int,
                           rank: int, seed: int, frame_stride: int = 1, target_fps: float | None = None,
                           max_crop: float = 0.25, flip: bool = False, plan: BucketPlan | None = None):
    """(dataset, batch sampler, report) for a training run. `plan`: one made already (saved_or_new_plan, on one
    rank and shared), else planned here (deterministic, so every rank plans alike, but each reads every header).
    The report (the run's buckets.json) carries the plan and its key, for saved_or_new_plan."""
    from data.sampler import BucketBatchSampler

    buckets = parse_buckets(specs)
    if plan is None:
        plan = plan_buckets(records, buckets, frame_stride, target_fps, max_crop)
    sampler = BucketBatchSampler(plan.bucket_of, batch_size, num_replicas, rank, seed)
    dataset = BucketedClipDataset(records, plan, frame_stride, target_fps, seed, flip=flip)
    report = {**plan.report(batch_size * num_replicas), "steps_per_epoch": sampler.batches_per_epoch,
              "plan_key": plan_key(records, buckets, frame_stride, target_fps, max_crop),
              "bucket_of": plan.bucket_of}
    return dataset, sampler, report


def collate_bucketed(items: list[dict]) -> dict:
    """collate_clips plus the batch's bucket name ("FxHxW"); refuses a batch that mixes buckets."""
    names = {item["bucket"] for item in items}
    if len(names) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(names)}: use BucketBatchSampler as the batch_sampler")
    return {**collate_clips(items), "bucket": names.pop()}
