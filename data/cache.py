"""The latent and text-embedding cache: its on-disk format, reader and writer. The only module that
knows how the cache is laid out.

Layout of a cache folder::

    fingerprint.json                    what produced the cache (VAE, encoder, frames, dtype, format version ...)
    shards/r{rank}-{seq:06d}.safetensors  VAE posteriors and text embeddings, written atomically
    index/                              the clip and caption index (numpy arrays, memory-mapped), written at the end
    report-r{rank}.jsonl                clips (and manifest lines) skipped while building, with the reason
    report.json                         the last build's counts
    complete.json                       written last, once every clip of the manifest was encoded or
                                        skipped; a cache without it is a build that stopped half-way

Files respect the umask (a cache shared on a cluster is readable by the group).

Why shards with an index rather than one file per clip: at FaceVid-1K scale (270k clips x windows
x flips) one file per clip means millions of small files, which shared network filesystems handle
badly (metadata storms, slow listing). A shard holds a few hundred clips, and reads are memory-mapped
(`safe_open`), so a random clip costs one header lookup and one read of its bytes, never a load of the shard.

Why an index of arrays rather than a dict of names: 270k clips x 4 windows x 2 flips are millions of tensor
names. As a Python dict that is hundreds of MB per process, and every DataLoader worker ends up with its own
copy (reference counting writes to the pages fork shared). `index/` holds sorted fixed-width arrays instead
(CacheIndex), memory-mapped read-only: workers share the page cache and a lookup is a binary search.

Tensor names inside a shard:
- ``latent/{clip_id}/{start}/{flip}/mean`` (and ``.../std`` when the fingerprint's posterior is "mean+std"):
  the VAE posterior of the frame window that starts at frame ``start`` (``flip`` = 0 or 1 for the mirrored
  copy), shape (C, F, h, w). With posterior sampling on (vae.sample_posterior) the std is stored so every epoch
  draws a fresh latent as the uncached path does; with it off only the mean is (half the bytes), and the
  reader returns a zero std. A still image (a manifest "image" entry) is the window at start 0 with F = 1.
- ``text/{key}/embeds``, ``key`` = text_key(prompt): with text_storage "trimmed", only the real tokens'
  states (n, D), padded with zeros and given a mask at read time; otherwise (a model that attends to padding,
  or a tokenizer that does not pad on the right) all max_length states (L, D) and ``text/{key}/mask`` (L,) uint8.

A shard is only ever visible complete (temp name + rename); an interrupted build loses at most
the clips of the shard it was filling and re-encodes only those.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# 2: index/, trimmed text embeddings, mean-only posteriors, hub models identified by their snapshot revision.
FORMAT_VERSION = 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPLETE_MARKER = "complete.json"
INDEX_DIR = "index"
REBUILD_COMMAND = "accelerate launch cache.py --config <your config> --rebuild"


class CacheFormatError(ValueError):
    """A cache written by another version of the format."""


def text_key(prompt: str, encoder_id: str, max_length: int) -> str:
    """Text embeddings are keyed by what determines them: prompt, encoder and token length."""
    return hashlib.sha1(f"{encoder_id}\x00{max_length}\x00{prompt}".encode()).hexdigest()[:24]


def latent_name(clip_id: str, start: int, flip: int, part: str) -> str:
    return f"latent/{clip_id}/{start}/{flip}/{part}"


@dataclass
class CacheFingerprint:
    """Everything that changes the cached tensors. A cache is used only if all fields match (see `serving`)."""

    format_version: int
    vae: str
    vae_weights: str  # sha256 of a local folder's weights, or hub:{repo}@{commit} (model_identity)
    text_encoder: str
    text_encoder_weights: str
    text_max_length: int
    text_storage: str  # "trimmed" (real tokens only) | "padded" (all max_length states + mask)
    resolution: int
    num_frames: int
    frame_stride: int
    target_fps: float | None
    windows_per_clip: int
    flip: bool
    dtype: str
    posterior: str  # "mean+std" (vae.sample_posterior) | "mean"
    preprocessing: str = "resize shortest side (bilinear, antialias) + center crop, scale to [-1, 1]"

    # A cache holding more than a config needs serves it: the std is ignored without posterior sampling, and
    # padded text states (with their mask) serve a model that masks padding. Field -> the richer value.
    RICHER = {"posterior": "mean+std", "text_storage": "padded"}

    def serving(self, found: "CacheFingerprint | None") -> "CacheFingerprint":
        """This fingerprint with the richer storage of `found` where it has it: what a build adds to that cache."""
        if found is None:
            return self
        return replace(self, **{k: v for k, v in self.RICHER.items() if getattr(found, k) == v})

    def differences(self, other: "CacheFingerprint") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: cache has {theirs[k]!r}, config needs {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


def read_fingerprint(cache_dir: Path) -> CacheFingerprint | None:
    """The cache's fingerprint; None without one. CacheFormatError for a cache of another format version."""
    path = Path(cache_dir) / "fingerprint.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{path}: the cache there has format version {version}, this FaceVid reads version {FORMAT_VERSION} "
            f"only; rebuild it with `{REBUILD_COMMAND}` (deletes the old cache files first), or point "
            f"data.cache_dir at a new folder")
    return CacheFingerprint(**raw)


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
    """Before a build adds to the cache: the index is rewritten at its end."""
    (Path(cache_dir) / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(Path(cache_dir) / INDEX_DIR, ignore_errors=True)


def discard_cache(cache_dir: str | Path) -> None:
    """Remove every file of the cache format, of any version (nothing else), from cache_dir."""
    cache_dir = Path(cache_dir)
    for path in [*shard_files(cache_dir), *(cache_dir / "shards").glob(".tmp-*"), *cache_dir.glob("report-r*.jsonl"),
                 cache_dir / "report.json", cache_dir / COMPLETE_MARKER, cache_dir / "fingerprint.json"]:
        path.unlink(missing_ok=True)
    for folder in [cache_dir / INDEX_DIR, *cache_dir.glob(f".{INDEX_DIR}-*")]:
        shutil.rmtree(folder, ignore_errors=True)


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
    """sha256 over a model folder's weight files (or 'unhashable:<folder>' when it has none)."""
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


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def snapshot_revision(folder: str | Path) -> str | None:
    """hub:{repo}@{commit} when `folder` lies in a Hugging Face cache snapshot (models--org--name/snapshots/
    <commit>/...), else None. A snapshot's files never change, so its commit identifies them."""
    parts = Path(folder).expanduser().absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            return f"hub:{parts[i][len('models--'):].replace('--', '/')}@{parts[i + 2]}"
    return None


def hub_revision(repo_id: str, hub_cache: str | Path | None = None) -> str:
    """hub:{repo}@{commit}: the snapshot that from_pretrained(repo_id) loads, i.e. the local cache's refs/main, or
    (not downloaded yet) the commit the hub serves now. ValueError when neither can be known."""
    from huggingface_hub import constants

    root = Path(hub_cache or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = root / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text().strip()
        if (root / "snapshots" / commit).is_dir():
            return f"hub:{repo_id}@{commit}"
    try:
        from huggingface_hub import HfApi

        commit = HfApi().model_info(repo_id).sha
    except Exception as err:  # offline, unknown repo, no access: all mean the same here
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache ({root}) and the hub could not say "
                         f"which revision it serves ({type(err).__name__}: {err}); download it first "
                         f"(`hf download {repo_id}`) or give a local folder") from err
    return f"hub:{repo_id}@{commit}"


def model_identity(pretrained: str, subfolder: str | None = None) -> str:
    """What identifies a model's weights in a fingerprint: a hub model (by id, or a folder inside the hub cache)
    by its snapshot's commit, without reading gigabytes of weights; any other local folder by its weights' hash."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        return snapshot_revision(folder) or hash_weights(folder / (subfolder or ""))
    return hub_revision(pretrained)


class CacheWriter:
    """Buffers one rank's tensors and writes them as shards of about `shard_clips` clips."""

    def __init__(self, cache_dir: str | Path, rank: int, shard_clips: int = 256, dtype: str = "fp16",
                 store_std: bool = True, trim_text: bool = True):
        self.shard_dir = Path(cache_dir) / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.shard_clips = shard_clips
        self.dtype = DTYPES[dtype]
        self.store_std = store_std
        self.trim_text = trim_text
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_clips = 0
        existing = sorted(self.shard_dir.glob(f"r{rank}-*.safetensors"))
        self.next_seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.bytes_written = 0

    def add_latent(self, clip_id: str, start: int, flip: int, mean: torch.Tensor, std: torch.Tensor | None) -> None:
        self.pending[latent_name(clip_id, start, flip, "mean")] = mean.to(self.dtype).contiguous().cpu()
        if self.store_std:
            self.pending[latent_name(clip_id, start, flip, "std")] = std.to(self.dtype).contiguous().cpu()

    def add_text(self, key: str, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """embeds (L, D) and mask (L,) as the text encoder returns them (padded to max_length)."""
        tokens = int(mask.sum())
        # Trim only what the reader can rebuild: real tokens first, then padding (right padding).
        if self.trim_text and tokens > 0 and bool(mask[:tokens].all()):
            self.pending[f"text/{key}/embeds"] = embeds[:tokens].to(self.dtype).contiguous().cpu()
            return
        self.pending[f"text/{key}/embeds"] = embeds.to(self.dtype).contiguous().cpu()
        self.pending[f"text/{key}/mask"] = mask.to(torch.uint8).contiguous().cpu()

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


WINDOW_DTYPE = np.dtype([("start", "<i4"), ("flip", "u1"), ("shard", "<i4")])
TEXT_DTYPE = np.dtype([("shard", "<i4"), ("padded", "u1")])
_INDEX_ARRAYS = ("clips", "clip_windows", "windows", "texts", "text_info")


class CacheIndex:
    """Which shard holds each clip window and caption, as sorted fixed-width numpy arrays:

    - clips (N,) bytes: the clip ids (UTF-8), sorted; clip_windows (N + 1,) int64: clip i's windows are
      windows[clip_windows[i]:clip_windows[i + 1]], each (start, flip, shard), sorted;
    - texts (T,) bytes: the caption keys, sorted; text_info (T,) (shard, padded).

    Written to index/ at the end of a build and memory-mapped read-only by readers, so DataLoader workers share
    it (no per-worker copy) and a lookup is a binary search. Pickles as its folder when loaded from one."""

    def __init__(self, shards: list[str], clips, clip_windows, windows, texts, text_info, folder: Path | None = None):
        self.shards, self.folder = shards, folder
        self.clips, self.clip_windows, self.windows = clips, clip_windows, windows
        self.texts, self.text_info = texts, text_info

    @classmethod
    def from_names(cls, shards: list[str], names: Iterable[tuple[int, str]]) -> "CacheIndex":
        """From (shard number, tensor name) pairs, e.g. every shard's header."""
        clip_ids, starts, flips, clip_shards, text_shards, masked = [], [], [], [], {}, set()
        for shard, name in names:
            if name.startswith("latent/") and name.endswith("/mean"):
                clip_id, start, flip, _ = name[len("latent/"):].rsplit("/", 3)  # clip ids may contain "/"
                clip_ids.append(clip_id.encode())
                starts.append(int(start))
                flips.append(int(flip))
                clip_shards.append(shard)
            elif name.startswith("text/"):
                key, part = name[len("text/"):].rsplit("/", 1)
                if part == "embeds":
                    text_shards.setdefault(key, shard)
                elif part == "mask":
                    masked.add(key)
        ids = np.array(clip_ids, dtype=f"S{max([1, *map(len, clip_ids)])}")
        windows = np.empty(len(ids), WINDOW_DTYPE)
        windows["start"], windows["flip"], windows["shard"] = starts, flips, clip_shards
        order = np.lexsort((windows["flip"], windows["start"], ids))
        ids, windows = ids[order], windows[order]
        clips, first = np.unique(ids, return_index=True)
        keys = sorted(text_shards)
        text_info = np.empty(len(keys), TEXT_DTYPE)
        text_info["shard"] = [text_shards[k] for k in keys]
        text_info["padded"] = [k in masked for k in keys]
        return cls(list(shards), clips, np.append(first, len(ids)).astype(np.int64), windows,
                   np.array([k.encode() for k in keys], dtype="S24"), text_info)

    @classmethod
    def scan(cls, cache_dir: str | Path) -> "CacheIndex":
        """From the shards' safetensors headers (a cache being built, whose index/ is not written yet)."""
        shards = shard_files(cache_dir)

        def names():
            for number, path in enumerate(shards):
                with safe_open(str(path), framework="pt") as handle:
                    yield from ((number, name) for name in handle.keys())

        return cls.from_names([p.name for p in shards], names())

    def save(self, cache_dir: str | Path) -> None:
        """Write index/ (a temporary folder renamed into place)."""
        cache_dir = Path(cache_dir)
        tmp = cache_dir / f".{INDEX_DIR}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in _INDEX_ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(self, name))
        (tmp / "shards.json").write_text(json.dumps(self.shards))
        for path in tmp.iterdir():
            _readable(path)
        shutil.rmtree(cache_dir / INDEX_DIR, ignore_errors=True)
        os.replace(tmp, cache_dir / INDEX_DIR)

    @classmethod
    def load(cls, cache_dir: str | Path) -> "CacheIndex | None":
        """The memory-mapped index/, or None when absent or not made from the shards now in the folder."""
        folder = Path(cache_dir) / INDEX_DIR
        if not (folder / "shards.json").is_file():
            return None
        shards = json.loads((folder / "shards.json").read_text())
        if shards != [p.name for p in shard_files(cache_dir)]:
            return None
        # Plain ndarray views of the read-only maps: np.memmap's own indexing costs more than the lookup.
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r").view(np.ndarray) for name in _INDEX_ARRAYS}
        return cls(shards, folder=folder, **arrays)

    def __reduce__(self):
        if self.folder is not None:  # a worker process maps the files itself rather than receiving a copy
            return (CacheIndex.load, (self.folder.parent,))
        return (CacheIndex, (self.shards, self.clips, self.clip_windows, self.windows, self.texts, self.text_info))

    @staticmethod
    def _find(sorted_keys: np.ndarray, key: bytes) -> int | None:
        row = int(np.searchsorted(sorted_keys, key))
        return row if row < len(sorted_keys) and sorted_keys[row] == key else None

    def clip_row(self, clip_id: str) -> int | None:
        return self._find(self.clips, clip_id.encode())

    def windows_of(self, row: int) -> list[tuple[int, int, int]]:
        """[(start, flip, shard)] of the clip in `row`."""
        return self.windows[self.clip_windows[row]:self.clip_windows[row + 1]].tolist()

    def text_row(self, key: str) -> int | None:
        return self._find(self.texts, key.encode())

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in _INDEX_ARRAYS)


class ClipWindows(Mapping):
    """clip id -> [(start, flip), ...]: a read-only mapping view of the index (nothing copied per clip)."""

    def __init__(self, index: CacheIndex):
        self.index = index

    def __getitem__(self, clip_id: str) -> list[tuple[int, int]]:
        row = self.index.clip_row(clip_id)
        if row is None:
            raise KeyError(clip_id)
        return [(start, flip) for start, flip, _ in self.index.windows_of(row)]

    def __contains__(self, clip_id) -> bool:
        return isinstance(clip_id, str) and self.index.clip_row(clip_id) is not None

    def __iter__(self):
        return (clip.decode() for clip in self.index.clips)

    def __len__(self) -> int:
        return len(self.index.clips)


class LatentCache:
    """Read side: the index (index/ memory-mapped when the build finished, else read from the shards' headers)
    says which shard holds what; tensors are read memory-mapped from the shards."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.fingerprint = read_fingerprint(self.cache_dir)
        complete = cache_state(self.cache_dir) == "complete"
        self.index = (complete and CacheIndex.load(self.cache_dir)) or CacheIndex.scan(self.cache_dir)
        self.windows = ClipWindows(self.index)
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

    def _tensor(self, shard: int, name: str) -> torch.Tensor:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.cache_dir / "shards" / self.index.shards[shard]),
                                             framework="pt")
        return self._handles[shard].get_tensor(name)

    def has_clip(self, clip_id: str) -> bool:
        return clip_id in self.windows

    def has_text(self, key: str) -> bool:
        return self.index.text_row(key) is not None

    def latent(self, clip_id: str, start: int, flip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's posterior (mean, std), float32; std is zero in a mean-only cache (posterior "mean")."""
        row = self.index.clip_row(clip_id)
        found = [] if row is None else [w[2] for w in self.index.windows_of(row) if w[:2] == (start, flip)]
        if not found:
            raise KeyError(f"{self.cache_dir}: no cached window of clip {clip_id!r} at start {start}, flip {flip}")
        shard = found[0]
        mean = self._tensor(shard, latent_name(clip_id, start, flip, "mean")).float()
        if self.fingerprint is not None and self.fingerprint.posterior == "mean":
            return mean, torch.zeros_like(mean)
        return mean, self._tensor(shard, latent_name(clip_id, start, flip, "std")).float()

    def text(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (L, D) float32, mask (L,) bool) at the fingerprint's max length, as the text encoder returns
        them: trimmed entries get zero states and a False mask past their real tokens."""
        row = self.index.text_row(key)
        if row is None:
            raise KeyError(f"{self.cache_dir}: no cached text embedding {key!r}")
        shard, padded = self.index.text_info[row].tolist()
        embeds = self._tensor(shard, f"text/{key}/embeds").float()
        if padded:
            return embeds, self._tensor(shard, f"text/{key}/mask").bool()
        tokens, length = embeds.shape[0], self.fingerprint.text_max_length
        mask = torch.zeros(length, dtype=torch.bool)
        mask[:tokens] = True
        return torch.nn.functional.pad(embeds, (0, 0, 0, length - tokens)), mask

    def text_keys(self) -> list[str]:
        return [key.decode() for key in self.index.texts]

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in shard_files(self.cache_dir))
