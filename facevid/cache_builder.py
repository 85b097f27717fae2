"""Build the latent + text-embedding cache (format: data/cache.py), split across Accelerate ranks.

    accelerate launch cache.py --config configs/demo.yaml

Each rank encodes every world_size-th clip not already cached (and its share of the captions),
writing its own shards; a re-run after an interruption skips what is already on disk. Within a rank,
DataLoader workers (data.num_workers) decode the clips while the main process encodes: windows are
gathered into batches of data.cache_encode_batch (default 4 on an accelerator) for each VAE call, so the
accelerator is not left idle waiting for one window at a time to be decoded.
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
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.cache import (
    FORMAT_VERSION,
    CacheFingerprint,
    CacheFormatError,
    CacheIndex,
    CacheWriter,
    LatentCache,
    cache_state,
    discard_cache,
    mark_complete,
    mark_incomplete,
    model_identity,
    read_fingerprint,
    text_key,
    write_fingerprint,
)
from data.dataset import read_still_image, window_starts
from data.manifest import ClipRecord, SkippedItem, append_skip_report, read_manifest
from data.video import VideoDecodeError, frames_to_tensor, probe_video, read_frames
from facevid.engine import patient_barrier
from facevid.hub import resolve_pretrained
from facevid.schema import ConfigError, RunConfig
from facevid.validation import validate_clips
from models.text_encoder import FrozenTextEncoder
from models.vae import encode_video_posterior, load_vae

logger = logging.getLogger("facevid")
TEXT_BATCH = 64


def model_reads_padding(cfg: RunConfig) -> bool:
    """Whether the denoiser attends to the text encoder's padding states. FaceVid's own UNet and DiT mask padding
    out, so the cache stores only the real tokens' states; ModelScope-layout UNets, AnimateDiff motion modules
    and pretrained UNets (diffusers' attend to every token) read the padding states, which depend on the
    prompt and must be stored."""
    u = cfg.unet
    if u.backbone == "dit":
        return False
    return u.layout != "facevid" or u.pretrained is not None or u.motion_module is not None


def _identity(key: str, pretrained: str, subfolder: str | None) -> str:
    try:
        return model_identity(pretrained, subfolder)
    except ValueError as err:  # a hub model neither downloaded nor reachable
        raise ConfigError(f"config key {key!r} = {pretrained!r}: cannot fingerprint the latent cache: {err}") from err


def expected_fingerprint(cfg: RunConfig) -> CacheFingerprint:
    d = cfg.data
    encoder = resolve_pretrained(cfg.text_encoder.pretrained)
    vae_dir = Path(cfg.vae.pretrained) / (cfg.vae.subfolder or "")
    # A local folder is identified by its weights' hash, not its path (runs move; relative vs absolute); a hub
    # model (by id or a folder of the hub cache) by its snapshot's commit.
    vae_id = "local folder" if vae_dir.is_dir() else f"{cfg.vae.pretrained}/{cfg.vae.subfolder or ''}"
    return CacheFingerprint(
        format_version=FORMAT_VERSION,
        vae=vae_id,
        vae_weights=_identity("vae.pretrained", cfg.vae.pretrained, cfg.vae.subfolder),
        text_encoder=cfg.text_encoder.pretrained,
        text_encoder_weights=_identity("text_encoder.pretrained", encoder, cfg.text_encoder.subfolder),
        text_max_length=cfg.text_encoder.max_length,
        text_storage="padded" if model_reads_padding(cfg) else "trimmed",
        resolution=d.resolution,
        num_frames=d.num_frames,
        frame_stride=d.frame_stride,
        target_fps=d.target_fps,
        windows_per_clip=d.cache_windows_per_clip,
        flip=d.flip,
        dtype=d.cache_dtype,
        posterior="mean+std" if cfg.vae.sample_posterior else "mean",
    )


def found_fingerprint(cfg: RunConfig) -> CacheFingerprint | None:
    """The fingerprint of the cache in data.cache_dir (None: no cache); a ConfigError for an old format."""
    try:
        return read_fingerprint(Path(cfg.data.cache_dir))
    except CacheFormatError as err:
        raise ConfigError(f"config key 'data.cache_dir' = {cfg.data.cache_dir!r}: {err}") from err


def check_cache(cfg: RunConfig, building: bool = False, expected: CacheFingerprint | None = None) -> None:
    """Refuse a cache built for another setup: a ConfigError naming each differing fingerprint field and what
    to do. `expected`: expected_fingerprint(cfg) when already computed (it may hash the model weights)."""
    cache_dir = Path(cfg.data.cache_dir)
    found = found_fingerprint(cfg)
    if found is None:
        if building:
            return
        raise ConfigError(f"config key 'data.cache_dir' = {str(cache_dir)!r}: holds no cache (fingerprint.json "
                          f"missing); build it with `accelerate launch cache.py --config <your config>` or set "
                          f"data.cache=auto")
    differences = (expected or expected_fingerprint(cfg)).serving(found).differences(found)
    if not differences:
        return
    fixes = [f"set those keys back to what the cache was built with, or build a cache for this config: point "
             f"data.cache_dir at a new folder (or delete {cache_dir})"]
    fixes.append("and run `accelerate launch cache.py --config <your config>`" if building else
                 "and run `accelerate launch cache.py --config <your config>` or train with data.cache=auto")
    raise ConfigError(f"config key 'data.cache_dir' = {str(cache_dir)!r}: the cache there was built for a "
                      f"different setup and will not be {'added to' if building else 'used'}:\n  "
                      + "\n  ".join(differences) + "\nTo fix it, " + " ".join(fixes))


@dataclass
class BuildReport:
    clips_total: int = 0
    clips_already_cached: int = 0
    clips_encoded: int = 0
    windows_encoded: int = 0
    texts_encoded: int = 0
    skipped: list = field(default_factory=list)  # [video, reason]
    manifest_skipped: list = field(default_factory=list)  # [manifest line or video, reason]
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.clips_encoded / self.seconds if self.seconds else 0.0


def build_cache(cfg: RunConfig, accelerator) -> BuildReport:
    """Encode what is missing from cfg.data.cache_dir. All ranks must call it."""
    acc, d = accelerator, cfg.data
    cache_dir = Path(d.cache_dir)
    fingerprint = expected_fingerprint(cfg)
    found = found_fingerprint(cfg)
    if found and fingerprint.serving(found).differences(found) and _holds_no_clip(cache_dir):
        # What a build that failed or was killed before its first clip left: nothing worth keeping.
        if acc.is_main_process:
            logger.info("%s holds an unfinished cache of another setup without any clip: replacing it", cache_dir)
            discard_cache(cache_dir)
        acc.wait_for_everyone()
    check_cache(cfg, building=True, expected=fingerprint)
    # Adding to a cache that stores more (the std, padded text) than this config needs: keep storing it.
    fingerprint = fingerprint.serving(found_fingerprint(cfg))
    started = time.time()
    records, manifest_skipped = read_manifest(d.manifest)
    validate_clips(cfg, records)
    if acc.is_main_process:
        mark_incomplete(cache_dir)  # until every clip below is done
        write_fingerprint(cache_dir, fingerprint)
    acc.wait_for_everyone()
    try:
        report = _encode_missing(cfg, acc, records, fingerprint)
    except BaseException:
        if acc.is_main_process and _holds_no_clip(cache_dir):
            discard_cache(cache_dir)  # nothing worth resuming: leave nothing that could block another config
        raise
    report.seconds = time.time() - started
    own_report = cache_dir / f"report-r{acc.process_index}.jsonl"
    append_skip_report(own_report, [SkippedItem(*s) for s in report.skipped], kind="clip")
    if acc.is_main_process:
        append_skip_report(own_report, manifest_skipped, kind="manifest")
    report.manifest_skipped = [[s.source, s.reason] for s in manifest_skipped]
    total = _summarise(acc, report, cache_dir)
    if acc.is_main_process:
        CacheIndex.scan(cache_dir).save(cache_dir)  # readers map it instead of reading every shard's header
        mark_complete(cache_dir, {"clips_cached": total.clips_encoded + total.clips_already_cached,
                                  "clips_skipped": len(total.skipped), "manifest": str(Path(d.manifest).resolve()),
                                  "manifest_lines_skipped": len(manifest_skipped)})
    acc.wait_for_everyone()
    return total


def _holds_no_clip(cache_dir: Path) -> bool:
    return cache_state(cache_dir) == "incomplete" and not LatentCache(cache_dir).windows


class ClipWindowsToEncode(Dataset):
    """Item i: (record, [(start, flip, uint8 frames (F, H, W, 3))], None), every cached window of todo[i] and its
    mirrored copy, or (record, [], reason) when the clip cannot be read. Runs in DataLoader workers, so decoding
    overlaps the main process's encoding."""

    def __init__(self, records: list[ClipRecord], cfg: RunConfig):
        self.records, self.data = records, cfg.data

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record, d = self.records[i], self.data
        try:
            if record.is_image:  # a still image (joint image + video training): one 1-frame window at 0
                windows = [(0, read_still_image(record.video, d.resolution))]
            else:
                starts = window_starts(record, probe_video(record.video), d.num_frames, d.frame_stride,
                                       d.target_fps, max_windows=d.cache_windows_per_clip)
                windows = [(start, read_frames(record.video, indices, resolution=d.resolution))
                           for start, indices in starts]
        except (VideoDecodeError, OSError) as err:  # OSError: an unreadable image (PIL)
            reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
            return record, [], reason
        views = [(start, flip, np.ascontiguousarray(frames[:, :, ::-1] if flip else frames))
                 for start, frames in windows for flip in ((0, 1) if d.flip else (0,))]
        return record, views, None


def _encode_clips(vae, clips: list, frames_per_call: int, device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The posteriors of every window of `clips` ([(record, views)]), per clip and window. Windows of one shape
    (video windows; 1-frame stills) are encoded together, frames_per_call frames per VAE call."""
    flat = [(c, w) for c, (_, views) in enumerate(clips) for w in range(len(views))]
    results: list[list] = [[None] * len(views) for _, views in clips]
    by_shape: dict[tuple, list[tuple[int, int]]] = {}
    for c, w in flat:
        by_shape.setdefault(tuple(clips[c][1][w][2].shape), []).append((c, w))
    for members in by_shape.values():
        video = torch.stack([frames_to_tensor(np.asarray(clips[c][1][w][2])) for c, w in members]).to(device)
        mean, std = encode_video_posterior(vae, video, frames_per_call)
        for (c, w), m, s in zip(members, mean, std):
            results[c][w] = (m, s)
    return results


def encode_batch(cfg: RunConfig, device: torch.device) -> int:
    """Windows per VAE call: data.cache_encode_batch, or by default 4 on an accelerator and 1 on a CPU (on 2 cores
    the demo VAE encoded 8-window calls at 0.8x the speed of 1-window calls: the activations outgrow the caches)."""
    if cfg.data.cache_encode_batch is not None:
        return cfg.data.cache_encode_batch
    return 1 if device.type == "cpu" else 4


def _encode_missing(cfg: RunConfig, acc, records, fingerprint: CacheFingerprint) -> BuildReport:
    """This rank's share: the captions and clips not cached yet."""
    d = cfg.data
    cache_dir = Path(d.cache_dir)
    cached = LatentCache(cache_dir)
    report = BuildReport(clips_total=len(records))
    mine = [r for i, r in enumerate(records) if i % acc.num_processes == acc.process_index]
    todo = [r for r in mine if not cached.has_clip(r.clip_id)]
    report.clips_already_cached = len(mine) - len(todo)

    writer = CacheWriter(cache_dir, acc.process_index, d.cache_shard_clips, d.cache_dtype,
                         store_std=fingerprint.posterior == "mean+std",
                         trim_text=fingerprint.text_storage == "trimmed")
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
        # batch_size=None: one clip per item, as the worker returns it (its windows may differ in number). Its
        # own generator: the workers' seed must not come from the global RNG, which then initialises the model.
        loader = DataLoader(ClipWindowsToEncode(todo, cfg), batch_size=None, num_workers=d.num_workers,
                            generator=torch.Generator())
        clips = iter(loader)  # workers start decoding now, while the VAE loads
        vae = load_vae(cfg.vae.pretrained, cfg.vae.subfolder).to(device).eval()
        batch = encode_batch(cfg, device)
        frames_per_call = batch * d.num_frames
        pending: list[tuple[ClipRecord, list]] = []

        def encode_pending() -> None:
            for (record, views), posteriors in zip(pending, _encode_clips(vae, pending, frames_per_call, device)):
                for (start, flip, _), (mean, std) in zip(views, posteriors):
                    writer.add_latent(record.clip_id, start, flip, mean, std)
                writer.clip_done()
                report.clips_encoded += 1
                report.windows_encoded += len(views)
            pending.clear()

        for record, views, reason in tqdm(clips, total=len(todo), desc="cache: clips",
                                          disable=not acc.is_main_process, dynamic_ncols=True):
            if reason is not None:
                report.skipped.append([record.video, reason])
                continue
            pending.append((record, views))
            if sum(len(v) for _, v in pending) >= batch:
                encode_pending()
        encode_pending()
    writer.flush()
    report.bytes_written = writer.bytes_written
    return report


def _summarise(acc, report: BuildReport, cache_dir: Path) -> BuildReport:
    patient_barrier(acc)  # ranks' shares take different times, possibly longer than the process-group timeout
    every = gather_object([asdict(report)])
    acc.wait_for_everyone()
    total = BuildReport(
        clips_total=report.clips_total,
        clips_already_cached=sum(r["clips_already_cached"] for r in every),
        clips_encoded=sum(r["clips_encoded"] for r in every),
        windows_encoded=sum(r["windows_encoded"] for r in every),
        texts_encoded=sum(r["texts_encoded"] for r in every),
        skipped=[s for r in every for s in r["skipped"]],
        manifest_skipped=report.manifest_skipped,
        bytes_written=sum(r["bytes_written"] for r in every),
        seconds=max(r["seconds"] for r in every),
    )
    if acc.is_main_process:
        summary = {**asdict(total), "clips_per_second": round(total.clips_per_second, 2),
                   "processes": acc.num_processes, "manifest_lines_skipped": len(total.manifest_skipped)}
        (cache_dir / "report.json").write_text(json.dumps(summary, indent=2))
        logger.info(
            "cache %s: %d clips encoded (%d windows), %d already cached, %d captions, %d skipped, "
            "%.1f MB written, %.2f clips/s on %d process(es)",
            cache_dir, total.clips_encoded, total.windows_encoded, total.clips_already_cached,
            total.texts_encoded, len(total.skipped), total.bytes_written / 1e6, total.clips_per_second,
            acc.num_processes)
        for video, reason in (total.manifest_skipped + total.skipped)[:20]:
            logger.warning("  skipped %s: %s", video, reason)
    return total
