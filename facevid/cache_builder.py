"""Build the latent + text-embedding cache (format: data/cache.py), split across Accelerate ranks.

    accelerate launch cache.py --config configs/demo.yaml

Each rank encodes every world_size-th clip not already cached (and its share of the captions),
writing its own shards; a re-run after an interruption skips what is already on disk.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from data.cache import (
    FORMAT_VERSION,
    CacheFingerprint,
    CacheMismatchError,
    CacheWriter,
    LatentCache,
    hash_weights,
    read_fingerprint,
    text_key,
    write_fingerprint,
)
from data.dataset import read_still_image, window_starts
from data.manifest import read_manifest
from data.video import VideoDecodeError, frames_to_tensor, probe_video, read_frames
from facevid.config import RunConfig, resolve_pretrained
from models.text_encoder import FrozenTextEncoder
from models.vae import encode_video_posterior, load_vae

logger = logging.getLogger("facevid")
TEXT_BATCH = 64


def expected_fingerprint(cfg: RunConfig) -> CacheFingerprint:
    d = cfg.data
    encoder = resolve_pretrained(cfg.text_encoder.pretrained)
    vae_dir = Path(cfg.vae.pretrained) / (cfg.vae.subfolder or "")
    encoder_dir = Path(encoder) / (cfg.text_encoder.subfolder or "")
    # A local folder is identified by its weights' hash, not its path (runs move; relative vs absolute).
    vae_id = "local folder" if vae_dir.is_dir() else f"{cfg.vae.pretrained}/{cfg.vae.subfolder or ''}"
    return CacheFingerprint(
        format_version=FORMAT_VERSION,
        vae=vae_id,
        vae_weights_sha256=hash_weights(vae_dir) if vae_dir.is_dir() else f"hub:{cfg.vae.pretrained}",
        text_encoder=cfg.text_encoder.pretrained,
        text_encoder_weights_sha256=hash_weights(encoder_dir) if encoder_dir.is_dir() else f"hub:{encoder}",
        text_max_length=cfg.text_encoder.max_length,
        resolution=d.resolution,
        num_frames=d.num_frames,
        frame_stride=d.frame_stride,
        target_fps=d.target_fps,
        windows_per_clip=d.cache_windows_per_clip,
        flip=d.flip,
        dtype=d.cache_dtype,
    )


def rebuild_hint(cfg: RunConfig) -> str:
    return (f"delete {cfg.data.cache_dir} (or point data.cache_dir elsewhere) and run "
            f"`accelerate launch cache.py --config <your config>`, or train with data.cache=auto")


@dataclass
class BuildReport:
    clips_total: int = 0
    clips_already_cached: int = 0
    clips_encoded: int = 0
    windows_encoded: int = 0
    texts_encoded: int = 0
    skipped: list = field(default_factory=list)  # [video, reason]
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.clips_encoded / self.seconds if self.seconds else 0.0


def _encode_window(vae, frames: np.ndarray, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = encode_video_posterior(vae, frames_to_tensor(frames)[None].to(device), chunk)
    return mean[0], std[0]


def build_cache(cfg: RunConfig, accelerator) -> BuildReport:
    """Encode what is missing from cfg.data.cache_dir. All ranks must call it."""
    acc, d = accelerator, cfg.data
    cache_dir = Path(d.cache_dir)
    fingerprint = expected_fingerprint(cfg)
    found = read_fingerprint(cache_dir)
    if found is not None and fingerprint.differences(found):
        raise CacheMismatchError(
            f"{cache_dir} already holds a cache built for a different setup:\n  "
            + "\n  ".join(fingerprint.differences(found)) + f"\nRebuild it: {rebuild_hint(cfg)}")
    if acc.is_main_process:
        write_fingerprint(cache_dir, fingerprint)
    acc.wait_for_everyone()

    started = time.time()
    records, manifest_skipped = read_manifest(d.manifest)
    cached = LatentCache(cache_dir)
    report = BuildReport(clips_total=len(records))
    mine = [r for i, r in enumerate(records) if i % acc.num_processes == acc.process_index]
    todo = [r for r in mine if not cached.has_clip(r.clip_id)]
    report.clips_already_cached = len(mine) - len(todo)

    writer = CacheWriter(cache_dir, acc.process_index, d.cache_shard_clips, d.cache_dtype)
    device = acc.device
    encoder_id, max_length = cfg.text_encoder.pretrained, cfg.text_encoder.max_length

    # Captions first (cheap): each unique prompt is encoded once, by the rank its hash picks.
    prompts = {""} | {c for r in records for c in r.captions}
    keys = {p: text_key(p, encoder_id, max_length) for p in prompts}
    my_prompts = sorted(p for p in prompts if int(keys[p], 16) % acc.num_processes == acc.process_index
                        and not cached.has_text(keys[p]))
    if my_prompts:
        encoder = FrozenTextEncoder(resolve_pretrained(encoder_id), max_length, cfg.text_encoder.subfolder).to(device)
        for i in tqdm(range(0, len(my_prompts), TEXT_BATCH), desc="cache: captions", disable=not acc.is_main_process):
            batch = my_prompts[i : i + TEXT_BATCH]
            embeds, mask = encoder(batch)
            for prompt, e, m in zip(batch, embeds, mask):
                writer.add_text(keys[prompt], e, m)
        report.texts_encoded = len(my_prompts)
        writer.flush()
        del encoder

    if todo:
        vae = load_vae(cfg.vae.pretrained, cfg.vae.subfolder).to(device).eval()
        for record in tqdm(todo, desc="cache: clips", disable=not acc.is_main_process, dynamic_ncols=True):
            try:
                if record.is_image:  # a still image (joint image + video training): one 1-frame window at 0
                    windows = [(0, read_still_image(record.video, d.resolution))]
                else:
                    starts = window_starts(record, probe_video(record.video), d.num_frames, d.frame_stride,
                                           d.target_fps, max_windows=d.cache_windows_per_clip)
                    windows = ((start, read_frames(record.video, indices, resolution=d.resolution))
                               for start, indices in starts)
                for start, frames in windows:
                    for flip in ((0, 1) if d.flip else (0,)):
                        view = frames[:, :, ::-1] if flip else frames
                        mean, std = _encode_window(vae, np.ascontiguousarray(view), cfg.vae.chunk_frames, device)
                        writer.add_latent(record.clip_id, start, flip, mean, std)
                        report.windows_encoded += 1
            except (VideoDecodeError, OSError) as err:  # OSError: an unreadable image (PIL)
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                report.skipped.append([record.video, reason])
                writer.discard_clip(record.clip_id)
                continue
            writer.clip_done()
            report.clips_encoded += 1
    writer.flush()
    report.bytes_written = writer.bytes_written
    report.seconds = time.time() - started
    if report.skipped:
        with open(cache_dir / f"report-r{acc.process_index}.jsonl", "a", encoding="utf-8") as handle:
            for video, reason in report.skipped:
                handle.write(json.dumps({"video": video, "reason": reason}) + "\n")
    return _summarise(acc, report, cache_dir, len(manifest_skipped))


def _summarise(acc, report: BuildReport, cache_dir: Path, manifest_skipped: int) -> BuildReport:
    every = gather_object([asdict(report)])
    acc.wait_for_everyone()
    total = BuildReport(
        clips_total=report.clips_total,
        clips_already_cached=sum(r["clips_already_cached"] for r in every),
        clips_encoded=sum(r["clips_encoded"] for r in every),
        windows_encoded=sum(r["windows_encoded"] for r in every),
        texts_encoded=sum(r["texts_encoded"] for r in every),
        skipped=[s for r in every for s in r["skipped"]],
        bytes_written=sum(r["bytes_written"] for r in every),
        seconds=max(r["seconds"] for r in every),
    )
    if acc.is_main_process:
        summary = {**asdict(total), "clips_per_second": round(total.clips_per_second, 2),
                   "processes": acc.num_processes, "manifest_lines_skipped": manifest_skipped}
        (cache_dir / "report.json").write_text(json.dumps(summary, indent=2))
        logger.info(
            "cache %s: %d clips encoded (%d windows), %d already cached, %d captions, %d skipped, "
            "%.1f MB written, %.2f clips/s on %d process(es)",
            cache_dir, total.clips_encoded, total.windows_encoded, total.clips_already_cached,
            total.texts_encoded, len(total.skipped), total.bytes_written / 1e6, total.clips_per_second,
            acc.num_processes)
        for video, reason in total.skipped[:20]:
            logger.warning("  skipped %s: %s", video, reason)
    return total
