"""The one manifest format every dataset ends in: JSONL, one clip per line.

A line looks like::

    {"id": "hdtf_0001", "video": "clips/hdtf_0001.mp4",
     "captions": ["a woman with long black hair talking"],
     "attributes": {"hair_color": "black", "action": "talking"},
     "fps": 25.0, "frame_range": [0, 250], "time_range": null}

- ``video`` is relative to the manifest's folder (or absolute).
- A still image is an entry too (joint image + video training, data.image_batch_share): ``"image":
  "faces/a.png"`` instead of ``video`` (or a ``video`` path with an image extension: .png, .jpg, .jpeg,
  .webp); ``ClipRecord.is_image`` tells it apart (by extension). fps and ranges do not apply to it. A 1-frame
  video clip stays a clip: too short for a video batch (reported as skipped), usable as an image batch's frame.
- ``captions`` is a list of strings (one is drawn per training step); a single ``caption`` string
  is accepted too; any other type skips the line. A clip with no caption is kept only when ``require_caption`` is off
  (unconditional training).
- ``attributes``, ``fps``, ``frame_range`` ([start, end) in frames) and ``time_range``
  ([start, end) in seconds) are optional.
- Any other key (``bbox``, ``source`` ...) is kept in ``ClipRecord.extra``.

Reading never raises on one bad line: the line is skipped and returned as a ``SkippedItem`` with
the reason, so that a run can report it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_KEYS = {"id", "video", "image", "caption", "captions", "attributes", "fps", "frame_range", "time_range"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ClipRecord:
    clip_id: str
    video: str  # absolute path
    captions: list[str]
    attributes: dict = field(default_factory=dict)
    fps: float | None = None
    frame_range: tuple[int, int] | None = None
    time_range: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        """A still image (trained only in image batches), told apart by its file extension."""
        return self.video.lower().endswith(IMAGE_EXTENSIONS)

    def to_json(self, relative_to: str | os.PathLike | None = None) -> dict:
        video = self.video
        if relative_to is not None:
            try:
                video = os.path.relpath(self.video, relative_to)
            except ValueError:  # different drive on Windows
                pass
        line = {"id": self.clip_id, "image" if self.is_image else "video": video, "captions": list(self.captions)}
        if self.attributes:
            line["attributes"] = self.attributes
        for key in ("fps", "frame_range", "time_range"):
            value = getattr(self, key)
            if value is not None:
                line[key] = list(value) if isinstance(value, tuple) else value
        line.update(self.extra)
        return line


@dataclass
class SkippedItem:
    """A clip (or manifest line) left out of a run, and why."""

    source: str  # video path, or "manifest.jsonl:LINE"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def _pair(value, cast, name: str):
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ValueError(f"'{name}' must be a [start, end] pair, got {value!r}")
    start, end = cast(value[0]), cast(value[1])
    if not end > start >= 0:
        raise ValueError(f"'{name}' must satisfy 0 <= start < end, got {value!r}")
    return (start, end)


def _describe(value) -> str:
    if isinstance(value, list):
        return "a list holding " + ", ".join(sorted({type(v).__name__ for v in value if not isinstance(v, str)}))
    return f"{type(value).__name__} {json.dumps(value)[:80]}"


def parse_line(obj: dict, root: Path, require_caption: bool = True) -> ClipRecord:
    """Turn one decoded JSON object into a ClipRecord; raises ValueError naming the bad key."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("video") and obj.get("image"):
        raise ValueError("both 'video' and 'image' given: an entry is one clip or one still image")
    media = obj.get("video") or obj.get("image")
    if not media:
        raise ValueError("missing 'video' (path of the clip, relative to the manifest) or 'image' (a still image)")
    if obj.get("image") and not str(media).lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"'image' = {media!r} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
    key = "captions" if "captions" in obj else "caption"
    captions = obj.get(key)
    if isinstance(captions, str):
        captions = [captions]
    # Anything else is refused, not guessed at: iterating an object would make its keys the captions.
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise ValueError(f"'{key}' must be a string or a list of strings, got "
                         f"{_describe(captions)}")
    captions = [c.strip() for c in (captions or []) if c.strip()]
    if require_caption and not captions:
        raise ValueError("missing caption ('caption' string or non-empty 'captions' list)")
    attributes = obj.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError(f"'attributes' must be an object, got {type(attributes).__name__}")
    fps = obj.get("fps")
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"'fps' must be a positive number, got {fps!r}")
    video = Path(media)
    if not video.is_absolute():
        video = root / video
    return ClipRecord(
        clip_id=str(obj.get("id") or video.stem),
        video=str(video),
        captions=captions,
        attributes=attributes,
        fps=float(fps) if fps is not None else None,
        frame_range=_pair(obj.get("frame_range"), int, "frame_range"),
        time_range=_pair(obj.get("time_range"), float, "time_range"),
        extra={k: v for k, v in obj.items() if k not in KNOWN_KEYS},
    )


def read_manifest(
    path: str | os.PathLike, require_caption: bool = True, check_files: bool = True
) -> tuple[list[ClipRecord], list[SkippedItem]]:
    """Read a manifest. Returns (records, skipped): bad lines and missing files are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.parent
    records: list[ClipRecord] = []
    skipped: list[SkippedItem] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = parse_line(json.loads(line), root, require_caption)
            except json.JSONDecodeError as err:
                skipped.append(SkippedItem(where, f"not valid JSON: {err.msg} at column {err.colno}"))
                continue
            except (ValueError, TypeError) as err:
                skipped.append(SkippedItem(where, str(err)))
                continue
            if check_files and not os.path.isfile(record.video):
                skipped.append(SkippedItem(record.video, f"video file not found (manifest line {line_no})"))
                continue
            records.append(record)
    return records, skipped


def append_skip_report(path: str | os.PathLike, skipped: list[SkippedItem], **fields) -> int:
    """Append {"video": source, "reason": reason, **fields} per item to a JSONL report, leaving out items the
    report already lists (a resumed run or a re-run build reads the same manifest again); returns the count."""
    path = Path(path)
    seen = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            seen.add((row.get("video"), row.get("reason")))
    new = [item for item in dict.fromkeys((s.source, s.reason) for s in skipped) if item not in seen]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            for source, reason in new:
                handle.write(json.dumps({"video": source, "reason": reason, **fields}) + "\n")
    return len(new)


def write_manifest(path: str | os.PathLike, records: list[ClipRecord]) -> Path:
    """Write records as JSONL with video paths relative to the manifest; atomic (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(relative_to=path.parent), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
