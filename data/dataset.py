"""The training dataset: fixed-length frame windows from the clips of a manifest.

Every random choice (window start, caption, flip) comes from ``np.random.default_rng([seed, epoch, index])``,
so an item is the same whichever DataLoader worker builds it, and a resumed run sees the same data as an
uninterrupted one. The epoch reaches the items in their keys: training samplers are wrapped in
`EpochTagged` (data/sampler.py), which hands out `EpochKey(epoch, key)`, so persistent workers (which keep
the dataset copy they started with) never train on a stale epoch. A plain key uses `set_epoch`'s epoch.

A clip that cannot be used (unreadable, corrupt, too short for the window) is replaced by the next one
((index + 1) % len) and reported in the item's ``skipped`` list, so every batch keeps its shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.manifest import ClipRecord, SkippedItem
from data.sampler import EpochKey
from data.video import (
    VideoDecodeError,
    VideoInfo,
    center_crop_resize,
    frames_to_tensor,
    probe_video,
    read_frames,
)


class _ClipDataset(Dataset):
    """What both datasets share: per-(seed, epoch, index) randomness and substitution of bad clips."""

    def __init__(self, records: list[ClipRecord], seed: int = 0, flip: bool = False, max_substitutions: int = 16):
        if not records:
            raise ValueError("no clip records: the dataset would be empty")
        self.records = list(records)
        self.seed = seed
        self.flip = flip  # horizontal flip with p = 0.5: the one augmentation faces tolerate
        self.max_substitutions = max_substitutions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        epoch = self.epoch
        if isinstance(key, EpochKey):  # the sampler's epoch wins: this copy may live in a persistent worker
            epoch, key = key
        return self._item(key, epoch)

    def _item(self, key, epoch: int) -> dict:
        return self._get(int(key), self._load, epoch)

    def _get(self, index: int, load, epoch: int, usable=None) -> dict:
        """load(record, rng) for the index's record, else for the next ones; records `usable` refuses are
        passed over without being reported (e.g. still images in a video batch)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        skipped: list[SkippedItem] = []
        for attempt in range(self.max_substitutions + 1):
            used = (index + attempt) % len(self.records)
            record = self.records[used]
            if usable is not None and not usable(record):
                continue
            try:
                item = load(record, rng)
            except (VideoDecodeError, OSError) as err:
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                skipped.append(SkippedItem(record.video, reason))
                continue
            return {**item, "clip_id": record.clip_id, "index": used, "skipped": skipped}
        tried = "\n  ".join(str(item) for item in skipped)
        raise RuntimeError(f"item {index}: no usable clip among {len(skipped)} tried:\n  {tried}")

    def _pick_caption_and_flip(self, record: ClipRecord, rng: np.random.Generator) -> tuple[str, bool]:
        # Drawn after the window and in this order by both datasets, so cached and on-the-fly
        # training make the same choices for the same (seed, epoch, index).
        caption = record.captions[rng.integers(len(record.captions))] if record.captions else ""
        flip = bool(self.flip and rng.random() < 0.5)
        return caption, flip

    def _load(self, record: ClipRecord, rng: np.random.Generator) -> dict:
        raise NotImplementedError


class VideoClipDataset(_ClipDataset):
    """Decodes a random frame window of each clip: {"pixel_values": (3, F, H, W) in [-1, 1], "caption"}."""

    def __init__(self, records: list[ClipRecord], num_frames: int, frame_stride: int = 1,
                 resolution: int = 64, seed: int = 0, target_fps: float | None = None,
                 max_substitutions: int = 16, flip: bool = False):
        super().__init__(records, seed, flip, max_substitutions)
        if num_frames < 1 or frame_stride < 1 or resolution < 1:
            raise ValueError(f"num_frames, frame_stride and resolution must be >= 1, "
                             f"got {num_frames}, {frame_stride}, {resolution}")
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.resolution = resolution
        self.target_fps = target_fps
        self._probes: dict[str, VideoInfo] = {}  # per process; a clip's header is read once

    def _probe(self, path: str) -> VideoInfo:
        if path not in self._probes:
            self._probes[path] = probe_video(path)
        return self._probes[path]

    def _load(self, record: ClipRecord, rng: np.random.Generator) -> dict:
        """Decode a window starting at a random valid start."""
        starts, stride = window_range(record, self._probe(record.video), self.num_frames, self.frame_stride,
                                      self.target_fps)
        start = starts[rng.integers(len(starts))]
        frames = read_frames(record.video, range(start, start + self.num_frames * stride, stride), self.resolution)
        caption, flip = self._pick_caption_and_flip(record, rng)
        if flip:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        return {"pixel_values": frames_to_tensor(frames), "caption": caption}


class _JointItems:
    """Joint image + video training (data.image_batch_share, VideoLDM / AnimateDiff style): an item is asked for
    as (record index, image) by JointBatchSampler (data/sampler.py); a plain int index is a video item
    (validation clips). image=False: a video window, still images passed over; image=True: one frame,
    `_load_image`. Mixed into both datasets below."""

    def _item(self, key, epoch: int) -> dict:
        index, image = key if isinstance(key, tuple) else (key, False)
        if image:
            return {**self._get(int(index), self._load_image, epoch), "image": True}
        return {**self._get(int(index), self._load, epoch, usable=lambda r: not r.is_image), "image": False}


def read_still_image(path: str, resolution: int) -> np.ndarray:
    """A still image as one uint8 frame (1, H, W, 3), cropped and resized as video frames are."""
    with Image.open(path) as handle:
        return center_crop_resize(np.asarray(handle.convert("RGB"))[None], resolution)


class JointImageVideoDataset(_JointItems, VideoClipDataset):
    """VideoClipDataset with image items, (3, 1, H, W): the still image of an image entry, or a random frame of a
    video clip's usable range (image batches use the clips' frames when the manifest has no image entries).
    Crop, resize, caption and flip as for videos; an unreadable image is replaced by the next record."""

    def _load_image(self, record: ClipRecord, rng: np.random.Generator) -> dict:
        if record.is_image:
            frames = read_still_image(record.video, self.resolution)
        else:
            starts, _ = window_range(record, self._probe(record.video), 1)
            frames = read_frames(record.video, [starts[rng.integers(len(starts))]], self.resolution)
        caption, flip = self._pick_caption_and_flip(record, rng)
        if flip:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        return {"pixel_values": frames_to_tensor(frames), "caption": caption}


def collate_joint(items: list[dict]) -> dict:
    """collate_clips, plus `image_batch`: True when the batch is still images (JointBatchSampler never mixes)."""
    kinds = {item["image"] for item in items}
    if len(kinds) != 1:
        raise ValueError("a batch mixes still images and video clips; JointBatchSampler never builds one")
    return {**collate_clips(items), "image_batch": kinds.pop()}


class CachedClipDataset(_ClipDataset):
    """Reads VAE posteriors and caption embeddings from a LatentCache (data/cache.py) instead of video.

    Each item draws one of the clip's cached windows, one of its captions and (if cached) the flip,
    as the on-the-fly dataset would. Clips the cache does not hold are left out and listed in
    `missing` (the trainer reports them), e.g. those skipped as undecodable when it was built.
    """

    def __init__(self, records: list[ClipRecord], cache, text_key, seed: int = 0, flip: bool = False,
                 max_substitutions: int = 16):
        present = [r for r in records if cache.has_clip(r.clip_id)]
        self.missing = [SkippedItem(r.video, _why_not_cached(cache, r)) for r in records
                        if not cache.has_clip(r.clip_id)]
        super().__init__(present, seed, flip, max_substitutions)
        self.cache = cache
        self.text_key = text_key  # prompt -> cache key, fixed by the text encoder and its max length

    def _load(self, record: ClipRecord, rng: np.random.Generator) -> dict:
        starts = sorted({start for start, _ in self.cache.windows[record.clip_id]})
        start = starts[rng.integers(len(starts))]
        caption, flip = self._pick_caption_and_flip(record, rng)
        mean, std = self.cache.latent(record.clip_id, start, int(flip))
        embeds, mask = self.cache.text(self.text_key(caption))
        return {"latent_mean": mean, "latent_std": std, "text_embeds": embeds, "text_mask": mask,
                "caption": caption}


def _why_not_cached(cache, record: ClipRecord) -> str:
    if record.video in cache.skipped:
        return f"not in the latent cache: skipped when it was built ({cache.skipped[record.video]})"
    return ("not in the latent cache, which was built from an earlier manifest: add it with data.cache=auto "
            "or cache.py")


class CachedJointDataset(_JointItems, CachedClipDataset):
    """CachedClipDataset with image items: an image entry's cached 1-frame latent, or one random frame of a
    random cached window of a clip (the VAE encodes frames independently, so that slice is exactly the frame's
    own posterior)."""

    def _load_image(self, record: ClipRecord, rng: np.random.Generator) -> dict:
        item = self._load(record, rng)
        frame = int(rng.integers(item["latent_mean"].shape[1]))
        return {**item, "latent_mean": item["latent_mean"][:, frame:frame + 1],
                "latent_std": item["latent_std"][:, frame:frame + 1]}



def usable_frames(record: ClipRecord, info: VideoInfo, frame_stride: int = 1,
                  target_fps: float | None = None) -> tuple[int, int, int]:
    """(first, end, stride): the frames [first, end) a window may use, and the stride between its frames.

    The usable frames are the record's frame_range, else its time_range (converted with the clip's
    fps), else the whole clip. With target_fps and a known fps, stride = max(1, round(fps / target_fps))
    replaces frame_stride.
    """
    fps = record.fps or info.fps  # the manifest's value wins over the container's
    stride = frame_stride
    if target_fps is not None and fps:
        stride = max(1, round(fps / target_fps))

    first, end = 0, info.num_frames
    if record.frame_range is not None:
        first, end = record.frame_range
    elif record.time_range is not None:
        if not fps:
            raise VideoDecodeError(record.video, "time_range given but the clip's fps is unknown")
        # Frame k is shown at k / fps: keep the frames whose time lies in [start, end).
        first, end = (math.ceil(t * fps - 1e-6) for t in record.time_range)
    return first, min(end, info.num_frames), stride


def window_range(record: ClipRecord, info: VideoInfo, num_frames: int, frame_stride: int = 1,
                 target_fps: float | None = None) -> tuple[range, int]:
    """(every valid window start, stride) for a clip (see usable_frames); VideoDecodeError when no window fits."""
    first, end, stride = usable_frames(record, info, frame_stride, target_fps)
    span = (num_frames - 1) * stride + 1
    if end - first < span:
        raise VideoDecodeError(record.video, f"too short: {max(end - first, 0)} usable frames in "
                                             f"[{first}, {end}), needs {span} ({num_frames} frames at "
                                             f"stride {stride})")
    return range(first, end - span + 1), stride


def window_starts(record: ClipRecord, info: VideoInfo, num_frames: int, frame_stride: int = 1,
                  target_fps: float | None = None, max_windows: int | None = None
                  ) -> list[tuple[int, list[int]]]:
    """Up to `max_windows` windows evenly spaced over the valid starts, as [(start, frame indices)].

    For precomputing (e.g. a latent cache): the same windows the dataset samples from, deterministically.
    """
    starts, stride = window_range(record, info, num_frames, frame_stride, target_fps)
    picks = starts
    if max_windows is not None and len(starts) > max_windows:
        picks = sorted({starts[i] for i in np.linspace(0, len(starts) - 1, max_windows).round().astype(int)})
    return [(start, list(range(start, start + num_frames * stride, stride))) for start in picks]


def collate_clips(items: list[dict]) -> dict:
    """Stack the tensors (pixel_values (B, 3, F, H, W), or the cached latents and embeddings); list
    captions, clip ids and indices; join the skipped lists."""
    batch = {key: torch.stack([item[key] for item in items])
             for key, value in items[0].items() if isinstance(value, torch.Tensor)}
    for key in ("caption", "clip_id", "index"):
        batch[key] = [item[key] for item in items]
    batch["skipped"] = [skip for item in items for skip in item["skipped"]]
    return batch
