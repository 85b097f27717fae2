"""The training dataset: fixed-length frame windows from the clips of a manifest.

Every random choice (window start, caption) comes from ``np.random.default_rng([seed, epoch, index])``,
so an item is the same whichever DataLoader worker builds it, and a resumed run sees the same data as an
uninterrupted one. Workers hold a copy of the dataset made when the DataLoader iterator starts: call
`set_epoch` before iterating each epoch (non-persistent workers, the DataLoader default, pick it up).

A clip that cannot be used (unreadable, corrupt, too short for the window) is replaced by the next one
((index + 1) % len) and reported in the item's ``skipped`` list, so every batch keeps its shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from data.manifest import ClipRecord, SkippedItem
from data.video import VideoDecodeError, VideoInfo, frames_to_tensor, probe_video, read_frames


class VideoClipDataset(Dataset):
    def __init__(self, records: list[ClipRecord], num_frames: int, frame_stride: int = 1,
                 resolution: int = 64, seed: int = 0, target_fps: float | None = None,
                 max_substitutions: int = 16):
        if not records:
            raise ValueError("no clip records: the dataset would be empty")
        if num_frames < 1 or frame_stride < 1 or resolution < 1:
            raise ValueError(f"num_frames, frame_stride and resolution must be >= 1, "
                             f"got {num_frames}, {frame_stride}, {resolution}")
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        self.records = list(records)
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.resolution = resolution
        self.seed = seed
        self.target_fps = target_fps
        self.max_substitutions = max_substitutions
        self.epoch = 0
        self._probes: dict[str, VideoInfo] = {}  # per process; a clip's header is read once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        skipped: list[SkippedItem] = []
        for attempt in range(self.max_substitutions + 1):
            used = (int(index) + attempt) % len(self.records)
            record = self.records[used]
            try:
                frames = self._read_window(record, rng)
            except (VideoDecodeError, OSError) as err:
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                skipped.append(SkippedItem(record.video, reason))
                continue
            caption = record.captions[rng.integers(len(record.captions))] if record.captions else ""
            return {"pixel_values": frames_to_tensor(frames), "caption": caption, "clip_id": record.clip_id,
                    "index": used, "skipped": skipped}
        tried = "\n  ".join(str(item) for item in skipped)
        raise RuntimeError(f"item {index}: no usable clip among {len(skipped)} tried:\n  {tried}")

    def _probe(self, path: str) -> VideoInfo:
        if path not in self._probes:
            self._probes[path] = probe_video(path)
        return self._probes[path]

    def _read_window(self, record: ClipRecord, rng: np.random.Generator) -> np.ndarray:
        """Decode a window starting at a random valid start."""
        starts, stride = window_range(record, self._probe(record.video), self.num_frames, self.frame_stride,
                                      self.target_fps)
        start = starts[rng.integers(len(starts))]
        indices = range(start, start + self.num_frames * stride, stride)
        return read_frames(record.video, indices, self.resolution)


def window_range(record: ClipRecord, info: VideoInfo, num_frames: int, frame_stride: int = 1,
                 target_fps: float | None = None) -> tuple[range, int]:
    """(every valid window start, stride) for a clip; VideoDecodeError when no window fits.

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
    end = min(end, info.num_frames)

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
    """Stack pixel_values to (B, 3, F, H, W); list captions, clip ids and indices; join skipped lists."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "caption": [item["caption"] for item in items],
        "clip_id": [item["clip_id"] for item in items],
        "index": [item["index"] for item in items],
        "skipped": [skip for item in items for skip in item["skipped"]],
    }
