"""EasyAnimate-style metadata: what the DH-FaceVid-1K authors' own training code reads.

DH-FaceVid-1K publishes no annotation schema of its own; its authors' training code (built on EasyAnimate) reads a
JSON list with one entry per clip or image::

    [{"file_path": "videos/00001.mp4", "text": "asian male, 20s, talking ...", "type": "video",
      "width": 512, "height": 512, "audio_emb_path": "audio_emb/00001.pt"},
     {"file_path": "images/00002.jpg", "text": "...", "type": "image"}]

- ``file_path``: relative to the data root (EasyAnimate's train_data_dir) or absolute.
- ``text``: the caption (a list of captions is accepted too).
- ``type``: "video" or "image"; when absent, taken from the file's extension (and said so in the report).
- ``width`` / ``height``: optional positive integers, kept in the manifest line.
- every other field ending in ``_path`` / ``_file`` / ``_dir`` is a side-car (audio embedding, phonemes, 3DMM,
  pose video ...): resolved against the root and kept under ``sidecars``; any other field becomes an attribute.

Clip ids are the entry's ``id`` / ``clip_id`` when given, else the file path below the root (data.adapters.common
clip_id_from_path); either way an opaque string, never parsed (the release mixes several sources' naming styles).
Image entries are left out by default (FaceVid trains on clips: a 1-frame clip would only be skipped as too
short), counted in the report; ``keep_images`` writes them as 1-frame clips marked ``"type": "image"``.
"""

from __future__ import annotations

from pathlib import Path

from data.adapters.common import (
    VIDEO_EXTENSIONS,
    AdapterResult,
    AnnotationError,
    clip_id_from_path,
    load_json,
)
from data.manifest import ClipRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TYPES = ("video", "image")
SIDECAR_SUFFIXES = ("_path", "_file", "_dir")
CORE_KEYS = ("file_path", "text", "type", "width", "height", "id", "clip_id")


def find_metadata(root: Path, metadata: Path | None, exclude: set[Path] = frozenset()) -> Path:
    """The metadata file: `metadata` when given, else the one .json directly in `root`."""
    if metadata is not None:
        if not metadata.is_file():
            raise FileNotFoundError(f"metadata file not found: {metadata}")
        return metadata
    found = sorted(p for p in root.glob("*.json") if not p.name.endswith(".report.json") and p.resolve() not in exclude)
    if len(found) != 1:
        raise FileNotFoundError(f"expected one metadata .json in {root} (found {len(found)}: "
                                f"{', '.join(p.name for p in found[:5])}); pass --annotations")
    return found[0]


def _resolve(root: Path, value, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"'{key}' must be a non-empty path string, got {value!r}")
    path = Path(value.strip())
    return path if path.is_absolute() else root / path


def _captions(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def _entry_type(entry: dict, path: Path) -> tuple[str, bool]:
    """(type, inferred): the entry's "type", or the one its file extension implies."""
    kind = entry.get("type")
    if kind is not None:
        if kind not in TYPES:
            raise AnnotationError(f"'type' must be one of {', '.join(TYPES)}, got {kind!r}")
        return kind, False
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video", True
    if suffix in IMAGE_EXTENSIONS:
        return "image", True
    raise AnnotationError(f"no 'type' and the extension {suffix!r} is neither a video nor an image")


def record_from_entry(entry, root: Path, allow_uncaptioned: bool) -> tuple[ClipRecord, str, bool, list[str]]:
    """(record, type, type inferred, missing side-cars) for one entry; raises AnnotationError when unusable."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"expected a JSON object per entry, got {type(entry).__name__}")
    if "file_path" not in entry:
        raise AnnotationError(f"no 'file_path' (keys: {', '.join(map(str, entry)) or 'none'})")
    path = _resolve(root, entry["file_path"], "file_path")
    kind, inferred = _entry_type(entry, path)
    captions = _captions(entry.get("text"))
    if not captions and not allow_uncaptioned:
        raise AnnotationError("no caption: 'text' is missing or empty (allow_uncaptioned for unconditional "
                              "training)")
    extra: dict = {"source": "easyanimate", "type": kind}
    for key in ("width", "height"):
        if key in entry:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnnotationError(f"'{key}' must be a positive integer, got {value!r}")
            extra[key] = value
    sidecars, missing, attributes = {}, [], {}
    for key, value in entry.items():
        if key in CORE_KEYS or value in (None, "", []):
            continue
        if isinstance(key, str) and key.endswith(SIDECAR_SUFFIXES):
            sidecar = _resolve(root, value, key)
            sidecars[key] = str(sidecar.resolve())
            if not sidecar.exists():
                missing.append(f"{key} {value!r}")
        else:
            attributes[key] = value
    if sidecars:
        extra["sidecars"] = sidecars
    given_id = entry.get("id", entry.get("clip_id"))
    if given_id is not None and not str(given_id).strip():
        raise AnnotationError(f"empty clip id {given_id!r}")
    if given_id is not None:
        clip_id = str(given_id).strip()
    else:
        relative = path.resolve().relative_to(root.resolve()) if path.resolve().is_relative_to(root.resolve()) \
            else Path(path.name)
        clip_id = clip_id_from_path(relative)
    record = ClipRecord(clip_id=clip_id, video=str(path.resolve()), captions=captions, attributes=attributes,
                        extra=extra)
    return record, kind, inferred, missing


def adapt(root: Path, metadata: Path | None = None, *, keep_images: bool = False, allow_uncaptioned: bool = False,
          exclude: set[Path] = frozenset()) -> AdapterResult:
    result = AdapterResult()
    try:
        metadata = find_metadata(root, metadata, exclude)
        entries = load_json(metadata)
    except AnnotationError as err:
        result.error(str(metadata), str(err))
        return result
    if not isinstance(entries, list):
        result.error(str(metadata), f"expected a JSON list of entries, got {type(entries).__name__}")
        return result
    inferred_types = 0
    sidecars_missing = []
    for index, entry in enumerate(entries):
        source = f"{metadata}[{index}]"
        try:
            record, kind, inferred, missing = record_from_entry(entry, root, allow_uncaptioned)
        except AnnotationError as err:
            result.error(source, str(err))
            continue
        if not Path(record.video).is_file():
            result.miss(source, f"{kind} {entry['file_path']!r} not found (relative to {root})")
            continue
        if kind == "image" and not keep_images:
            result.skip(source, f"image entry {entry['file_path']!r}: FaceVid trains on video clips "
                                "(keep_images / --keep-images writes it as a 1-frame clip)")
            continue
        inferred_types += inferred
        sidecars_missing += [f"{source}: {m}" for m in missing]
        result.add(record)
    if inferred_types:
        result.notes.append(f"{inferred_types} entries had no 'type': taken from the file extension")
    if sidecars_missing:
        result.notes.append(f"{len(sidecars_missing)} side-car paths do not exist (kept in the manifest): "
                            + "; ".join(sidecars_missing[:5]))
    return result
