"""The latent and text-embedding cache: its on-disk format, reader and writer. The only module that
knows how the cache is laid out.

Layout of a cache folder::

    fingerprint.json                    what produced the cache (VAE, encoder, frames, dtype ...)
    shards/r{rank}-{seq:06d}.safetensors  VAE posteriors and text embeddings, written atomically
    report-r{rank}.jsonl                clips (and manifest lines) skipped while building, with the reason
    report.json                         the last build's counts
    complete.json                       written last, once every clip of the manifest was encoded or
                                        skipped; a cache without it is a build that stopped half-way

Files respect the umask (a cache shared on a cluster is readable by the group).

Why shards with an index rather than one file per clip: at FaceVid-1K scale (270k clips x windows
x flips) one file per clip means millions of small files, which shared network filesystems handle
badly (metadata storms, slow listing). A shard holds a few hundred clips; its safetensors header
is the index of what it holds, and reads are memory-mapped (`safe_open`), so a random clip costs
one header lookup and one read of its bytes, never a load of the shard.

Tensor names inside a shard:
- ``latent/{clip_id}/{start}/{flip}/mean`` and ``.../std``: the VAE posterior of the frame window
  that starts at frame ``start`` (``flip`` = 0 or 1 for the mirrored copy), shape (C, F, h, w). The
  posterior is stored rather than one sample, so every epoch draws a fresh latent as the uncached
  path does. A still image (a manifest "image" entry) is stored as the window at start 0 with F = 1.
- ``text/{key}/embeds`` (L, D) and ``text/{key}/mask`` (L,) uint8, ``key`` = text_key(prompt).

A shard is only ever visible complete (temp name + rename); an interrupted build loses at most
the clips of the shard it was filling and re-encodes only those.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def text_key(prompt: str, encoder_id: str, max_length: int) -> str:
    """Text embeddings are keyed by what determines them: prompt, encoder and token length."""
    return hashlib.sha1(f"{encoder_id}\x00{max_length}\x00{prompt}".encode()).hexdigest()[:24]


def latent_name(clip_id: str, start: int, flip: int, part: str) -> str:
    return f"latent/{clip_id}/{start}/{flip}/{part}"


@dataclass
class CacheFingerprint:
    """Everything that changes the cached tensors. A cache is used only if all fields match."""

    format_version: int
    vae: str
    vae_weights_sha256: str
    text_encoder: str
    text_encoder_weights_sha256: str
    text_max_length: int
    resolution: int
    num_frames: int
    frame_stride: int
    target_fps: float | None
    windows_per_clip: int
    flip: bool
    dtype: str
    preprocessing: str = "resize shortest side (bilinear, antialias) + center crop, scale to [-1, 1]"

    def differences(self, other: "CacheFingerprint") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: cache has {theirs[k]!r}, config needs {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


COMPLETE_MARKER = "complete.json"


def read_fingerprint(cache_dir: Path) -> CacheFingerprint | None:
    path = Path(cache_dir) / "fingerprint.json"
    if not path.is_file():
        return None
    return CacheFingerprint(**json.loads(path.read_text()))


def cache_state(cache_dir: str | Path) -> str:
    """'missing' (no cache), 'incomplete' (a build that has not finished) or 'complete'."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / "fingerprint.json").is_file():
        return "missing"
    return "complete" if (cache_dir / COMPLETE_MARKER).is_file() else "incomplete"


def shard_files(cache_dir: str | Path) -> list[Path]:
    return sorted((Path(cache_dir) / "shards").glob("r*-*.safetensors"))


def mark_complete(cache_dir: str | Path, summary: dict) -> None:
    _write_text_atomic(Path(cache_dir) / COMPLETE_MARKER, json.dumps(summary, indent=2))


def mark_incomplete(cache_dir: str | Path) -> None:
    """Before a build adds to the cache."""
    (Path(cache_dir) / COMPLETE_MARKER).unlink(missing_ok=True)


def discard_cache(cache_dir: str | Path) -> None:
    """Remove every file of the cache format (nothing else) from cache_dir."""
    cache_dir = Path(cache_dir)
    for path in [*shard_files(cache_dir), *(cache_dir / "shards").glob(".tmp-*"), *cache_dir.glob("report-r*.jsonl"),
                 cache_dir / "report.json", cache_dir / COMPLETE_MARKER, cache_dir / "fingerprint.json"]:
        path.unlink(missing_ok=True)


def _readable(path: Path) -> None:
    # safetensors (like tempfile.mkstemp) creates files readable by their owner only: apply the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_text_atomic(path: Path, text: str) -> None:
    # A per-process temporary name: two runs sharing one cache may both write the (same) file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_fingerprint(cache_dir: Path, fingerprint: CacheFingerprint) -> None:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(cache_dir / "fingerprint.json", json.dumps(asdict(fingerprint), indent=2))


def hash_weights(folder: str | Path) -> str:
    """sha256 over a model folder's weight files (or 'unhashable:<id>' for a hub id not on disk)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        return f"unhashable:{folder}"
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


class CacheWriter:
    """Buffers one rank's tensors and writes them as shards of about `shard_clips` clips."""

    def __init__(self, cache_dir: str | Path, rank: int, shard_clips: int = 256, dtype: str = "fp16"):
        self.shard_dir = Path(cache_dir) / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.shard_clips = shard_clips
        self.dtype = DTYPES[dtype]
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_clips = 0
        existing = sorted(self.shard_dir.glob(f"r{rank}-*.safetensors"))
        self.next_seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.bytes_written = 0

    def add_latent(self, clip_id: str, start: int, flip: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.pending[latent_name(clip_id, start, flip, "mean")] = mean.to(self.dtype).contiguous().cpu()
        self.pending[latent_name(clip_id, start, flip, "std")] = std.to(self.dtype).contiguous().cpu()

    def add_text(self, key: str, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        self.pending[f"text/{key}/embeds"] = embeds.to(self.dtype).contiguous().cpu()
        self.pending[f"text/{key}/mask"] = mask.to(torch.uint8).contiguous().cpu()

    def discard_clip(self, clip_id: str) -> None:
        """Drop a clip's buffered windows (it failed half-way): a clip is cached whole or not at all."""
        prefix = f"latent/{clip_id}/"
        self.pending = {k: v for k, v in self.pending.items() if not k.startswith(prefix)}

    def clip_done(self) -> None:
        """Call after all windows of a clip were added: shards never split a clip."""
        self.pending_clips += 1
        if self.pending_clips >= self.shard_clips:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        final = self.shard_dir / f"r{self.rank}-{self.next_seq:06d}.safetensors"
        tmp = final.with_name(f".tmp-{final.name}")
        save_file(self.pending, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        _readable(tmp)
        os.replace(tmp, final)
        self.bytes_written += final.stat().st_size
        self.next_seq += 1
        self.pending, self.pending_clips = {}, 0


class LatentCache:
    """Read side: maps every tensor name to its shard from the shards' headers; reads are mmapped."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.fingerprint = read_fingerprint(self.cache_dir)
        self._where: dict[str, int] = {}
        self._shards = shard_files(self.cache_dir)
        self.windows: dict[str, list[tuple[int, int]]] = {}
        for shard_index, path in enumerate(self._shards):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    self._where[name] = shard_index
                    if name.startswith("latent/") and name.endswith("/mean"):
                        # clip ids may contain "/", so parse from the right
                        clip_id, start, flip, _ = name[len("latent/"):].rsplit("/", 3)
                        self.windows.setdefault(clip_id, []).append((int(start), int(flip)))
        self._handles: dict[int, object] = {}  # opened lazily, per process (handles do not pickle)
        # Why a clip is absent: the builds' skip reports (video -> reason).
        self.skipped: dict[str, str] = {}
        for report in sorted(self.cache_dir.glob("report-r*.jsonl")):
            for line in report.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                self.skipped[row["video"]] = row["reason"]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _tensor(self, name: str) -> torch.Tensor:
        shard = self._where[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._shards[shard]), framework="pt")
        return self._handles[shard].get_tensor(name)

    def has_clip(self, clip_id: str) -> bool:
        return clip_id in self.windows

    def has_text(self, key: str) -> bool:
        return f"text/{key}/embeds" in self._where

    def latent(self, clip_id: str, start: int, flip: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._tensor(latent_name(clip_id, start, flip, "mean")).float(),
                self._tensor(latent_name(clip_id, start, flip, "std")).float())

    def text(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensor(f"text/{key}/embeds").float(), self._tensor(f"text/{key}/mask").bool()

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._shards)
