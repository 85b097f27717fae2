"""FaceVid-1K / DH-FaceVid-1K: videos plus annotations with Ethnicity, Gender, Appearance, Emotion,
Action, Environment and a caption.

Annotations may come as one JSON per clip (``clip_0001.json`` next to or apart from the video), one
JSON file (a list of entries, or ``{clip_id: entry}``) or one JSONL file (an entry per line). Field
names are matched case-insensitively; every field other than id / video / caption becomes an
attribute with a lower_snake key, so fields a later release adds are kept too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from data.adapters.common import (
    AdapterResult,
    AnnotationError,
    VideoIndex,
    VideoMissing,
    load_json,
    snake_key,
    snake_keys,
)
from data.manifest import ClipRecord

ID_KEYS = ("id", "clip_id", "video_id", "name")
VIDEO_KEYS = ("video", "video_path", "path", "file", "filename", "video_name")
CAPTION_KEYS = ("caption", "captions", "text", "description")
# Order of a caption composed from the fields, as in the dataset's own captions
# ("asian male, 20s, wearing a white hoodie, talking, ... neutral expression, ... indoors ...").
CAPTION_FIELD_ORDER = ("ethnicity", "gender", "age", "appearance", "action", "emotion", "environment")
ANNOTATION_FIELDS = {"ethnicity", "gender", "appearance", "emotion", "action", "environment"}


def _first(entry: dict, keys) -> object:
    for key in keys:
        if entry.get(key) not in (None, "", []):
            return entry[key]
    return None


def _as_text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(_as_text(v) for v in value.values() if v not in (None, "", []))
    if isinstance(value, (list, tuple)):
        return ", ".join(_as_text(v) for v in value if v not in (None, "", []))
    return str(value).strip()


def compose_caption(attributes: dict) -> str:
    """A caption in the dataset's style from the annotation fields (used when no caption is given)."""
    parts = []
    for key in CAPTION_FIELD_ORDER:
        text = _as_text(attributes.get(key, ""))
        if not text:
            continue
        if key == "emotion" and "expression" not in text:
            text += " expression"
        parts.append(text)
    return ", ".join(parts)


def _looks_like_one_clip(obj: dict) -> bool:
    keys = {snake_key(k) for k in obj}
    return bool(keys & (ANNOTATION_FIELDS | set(CAPTION_KEYS) | set(VIDEO_KEYS)))


def iter_entries(path: Path) -> Iterator[tuple[str, object, str | None]]:
    """(source label, entry, clip id implied by the file's layout) for each entry of one file."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8-sig") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield f"{path}:{line_no}", json.loads(line), None
                    except json.JSONDecodeError as err:
                        yield f"{path}:{line_no}", AnnotationError(f"invalid JSON: {err.msg}"), None
        return
    data = load_json(path)
    if isinstance(data, list):
        for index, entry in enumerate(data):
            yield f"{path}[{index}]", entry, None
    elif isinstance(data, dict) and _looks_like_one_clip(data):
        yield str(path), data, path.stem
    elif isinstance(data, dict):
        for clip_id, entry in data.items():
            yield f"{path}:{clip_id}", entry, str(clip_id)
    else:
        raise AnnotationError(f"expected a JSON object or list, got {type(data).__name__}")


def find_annotation_files(root: Path, annotations: Path | None, exclude: set[Path]) -> list[Path]:
    if annotations is not None:
        if annotations.is_dir():
            root = annotations
        elif annotations.is_file():
            return [annotations]
        else:
            raise FileNotFoundError(f"annotations not found: {annotations}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if (path.suffix.lower() in (".json", ".jsonl") and not name.endswith(".report.json")
                    and path.resolve() not in exclude):
                found.append(path)
    return found


def record_from_entry(entry, implied_id: str | None, base: Path, videos: VideoIndex) -> ClipRecord:
    """One entry -> ClipRecord; raises AnnotationError when unusable, VideoMissing when not on disk."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"expected a JSON object per clip, got {type(entry).__name__}")
    fields = {snake_key(k): v for k, v in entry.items()}
    video_name = _first(fields, VIDEO_KEYS)
    clip_id = _first(fields, ID_KEYS) or implied_id or (Path(str(video_name)).stem if video_name else None)
    if not clip_id:
        raise AnnotationError("no clip id and no video path")
    clip_id = str(clip_id)
    attributes = snake_keys({k: v for k, v in fields.items()
                             if k not in (*ID_KEYS, *VIDEO_KEYS, *CAPTION_KEYS) and v not in (None, "", [])})
    captions = _first(fields, CAPTION_KEYS)
    if isinstance(captions, str):
        captions = [captions]
    captions = [c.strip() for c in captions or [] if isinstance(c, str) and c.strip()]
    extra = {"source": "facevid1k"}
    if not captions:
        captions = [compose_caption(attributes)]
        if not captions[0]:
            raise AnnotationError("no caption and none of the annotation fields to compose one from")
        extra["caption_source"] = "composed from attributes"
    video = videos.find(str(video_name or clip_id), base=base)
    if video is None:
        raise VideoMissing(f"video {str(video_name or clip_id)!r} not found under {videos.root}")
    return ClipRecord(clip_id=clip_id, video=str(video.resolve()), captions=captions, attributes=attributes,
                      extra=extra)


def adapt(root: Path, annotations: Path | None = None, exclude: set[Path] = frozenset()) -> AdapterResult:
    result = AdapterResult()
    videos = VideoIndex(root)
    files = find_annotation_files(root, annotations, exclude)
    if not files:
        result.notes.append(f"no .json/.jsonl annotation file found under {annotations or root}")
    for path in files:
        try:
            for source, entry, implied_id in iter_entries(path):
                try:
                    if isinstance(entry, AnnotationError):
                        raise entry
                    result.add(record_from_entry(entry, implied_id, path.parent, videos))
                except AnnotationError as err:
                    result.error(source, str(err))
                except VideoMissing as err:
                    result.miss(source, str(err))
        except (AnnotationError, OSError) as err:
            result.error(str(path), str(err))
    composed = sum("caption_source" in r.extra for r in result.records)
    if composed:
        result.notes.append(f"{composed} clips had no caption: composed one from their annotation fields")
    return result
