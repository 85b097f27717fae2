"""What both training stages use: the frame rate a run's videos play at, the dtype of frozen modules, and the fixed
validation clips."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch

from data.manifest import ClipRecord, read_manifest
from data.video import VideoDecodeError, probe_video
from facevid.schema import RunConfig

logger = logging.getLogger("facevid")

FALLBACK_FPS = 8.0  # playback fps when the training clips' frame rate is unknown


def training_fps(cfg: RunConfig, records: list[ClipRecord] | None = None) -> float:
    """The frame rate a run's videos should play at: sample.fps when given, else the rate the model is trained
    at (data.target_fps, or the clips' fps / data.frame_stride), else 8. `records` are the training clips; when
    None they are read from data.manifest if it exists."""
    if cfg.sample.fps is not None:
        return float(cfg.sample.fps)
    if cfg.data.target_fps is not None:
        return float(cfg.data.target_fps)
    if records is None:
        manifest = Path(cfg.data.manifest)
        records = read_manifest(manifest)[0] if manifest.is_file() else []
    source = _clips_fps(records)
    return source / cfg.data.frame_stride if source else FALLBACK_FPS


def _clips_fps(records: list[ClipRecord]) -> float | None:
    """The clips' typical frame rate: the manifest's values, else what the first readable videos' containers say."""
    records = [r for r in records if not r.is_image]  # still images have no frame rate
    known = [r.fps for r in records if r.fps]
    if not known:
        for record in records[:3]:
            try:
                fps = probe_video(record.video).fps
            except (OSError, VideoDecodeError):
                continue
            if fps:
                known.append(fps)
    return float(statistics.median(known)) if known else None


def frozen_weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen modules (text encoder, VAE): the mixed-precision weight dtype, as their outputs
    only feed the autocast forward. Also on CPU, where bf16 is not slower: the MiniLM encoder runs a batch of 8
    prompts 3x faster in bf16 than in fp32 on the development machines (AVX-512 BF16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def fixed_validation_clips(dataset, count: int) -> list[dict]:
    """The first clips of epoch 0: the same validation inputs at every validation step."""
    dataset.set_epoch(0)
    return [dataset[i] for i in range(min(count, len(dataset)))]
