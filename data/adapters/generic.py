"""Datasets without a release format of their own.

- folder: videos with a same-name ``.txt`` caption beside them (HDTF as distributed by most
  reproductions, TalkingHead-1KH crops, your own data). Each non-empty line of the ``.txt`` is one
  caption. Clip ids are the path below the root without extension, '/' replaced by '__'.
- csv: a table with a header row holding at least ``path`` and ``caption`` columns; paths are relative
  to the CSV's folder (or absolute). Rows repeating a path add captions to the same clip; any other
  column becomes an attribute (lower_snake key).
"""

from __future__ import annotations

import csv
from pathlib import Path

from data.adapters.common import (
    AdapterResult,
    AnnotationError,
    VideoIndex,
    clip_id_from_path,
    read_text_lines,
    snake_key,
)
from data.manifest import ClipRecord


def adapt_folder(root: Path, allow_uncaptioned: bool = False, source: str = "folder") -> AdapterResult:
    result = AdapterResult()
    videos = VideoIndex(root)
    for video in videos.all_paths():
        caption_file = video.with_suffix(".txt")
        try:
            captions = read_text_lines(caption_file) if caption_file.is_file() else []
            if not captions and not allow_uncaptioned:
                raise AnnotationError(f"no caption: {caption_file.name} is missing or empty "
                                      "(use --allow-uncaptioned for unconditional training)")
        except AnnotationError as err:
            result.error(str(video), str(err))
            continue
        result.add(ClipRecord(clip_id=clip_id_from_path(video.relative_to(root)), video=str(video.resolve()),
                              captions=captions, extra={"source": source}))
    # A caption whose video is gone is an annotated clip missing on disk.
    video_stems = {video.with_suffix("") for video in videos.all_paths()}
    for caption_file in sorted(root.rglob("*.txt")):
        if caption_file.with_suffix("") not in video_stems:
            result.miss(str(caption_file), "caption file has no video of the same name beside it")
    return result


def adapt_csv(csv_path: Path, root: Path | None = None) -> AdapterResult:
    """Rows of path,caption[,more columns]; `root` (default: the CSV's folder) anchors relative paths."""
    result = AdapterResult()
    root = root or csv_path.parent
    by_video: dict[Path, ClipRecord] = {}
    if not csv_path.is_file():
        result.error(str(csv_path), "CSV file not found")
        return result
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {snake_key(c): c for c in reader.fieldnames or []}
        if "path" not in columns or "caption" not in columns:
            result.error(str(csv_path), f"header must name 'path' and 'caption' columns, got {reader.fieldnames}")
            return result
        for row in reader:
            source = f"{csv_path}:{reader.line_num}"
            path_text = (row.get(columns["path"]) or "").strip()
            caption = (row.get(columns["caption"]) or "").strip()
            if None in row:  # more cells than header names: usually an unquoted comma in the caption
                result.error(source, "more cells than header columns (quote captions that contain commas)")
                continue
            if not path_text or not caption:
                result.error(source, "empty 'path' or 'caption' cell")
                continue
            video = Path(path_text) if Path(path_text).is_absolute() else root / path_text
            if not video.is_file():
                result.miss(source, f"video {path_text!r} not found (relative to {root})")
                continue
            video = video.resolve()
            if video in by_video:
                by_video[video].captions.append(caption)
                continue
            attributes = {snake_key(c): v.strip() for c, v in row.items()
                          if snake_key(c) not in ("path", "caption") and v and v.strip()}
            relative = video.relative_to(root.resolve()) if video.is_relative_to(root.resolve()) else video.name
            record = ClipRecord(clip_id=clip_id_from_path(relative), video=str(video), captions=[caption],
                                attributes=attributes, extra={"source": "csv"})
            by_video[video] = record
            result.add(record)
    return result
