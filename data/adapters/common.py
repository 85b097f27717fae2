"""What every dataset adapter shares: finding videos on disk, reading annotation files, reporting.

An adapter returns an `AdapterResult`; `finish` writes the manifest and ``<name>.report.json`` next to
it and prints a summary. Every annotated clip ends up in exactly one list of the result: written
(`records`), `missing` (annotated but no video on disk), `errors` (annotation unusable) or `skipped` (fine,
but left out by choice, e.g. image entries), so nothing is dropped without a name and a reason.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from data.manifest import ClipRecord, SkippedItem, write_manifest

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".gif")


class AnnotationError(ValueError):
    """One annotation entry cannot become a clip; the message says why."""


class VideoMissing(Exception):
    """The annotation is fine but its video is not on disk; the message names what was looked for."""


@dataclass
class AdapterResult:
    records: list[ClipRecord] = field(default_factory=list)
    missing: list[SkippedItem] = field(default_factory=list)
    errors: list[SkippedItem] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set, repr=False)

    @property
    def clips_found(self) -> int:
        return len(self.records) + len(self.missing) + len(self.errors) + len(self.skipped)

    def add(self, record: ClipRecord) -> None:
        """Adds a record unless its id is taken (ids key caches and reports, so they must be unique)."""
        if record.clip_id in self._ids:
            self.errors.append(SkippedItem(record.video, f"duplicate clip id {record.clip_id!r}"))
            return
        self._ids.add(record.clip_id)
        self.records.append(record)

    def miss(self, source: str, reason: str = "video file not found on disk") -> None:
        self.missing.append(SkippedItem(source, reason))

    def error(self, source: str, reason: str) -> None:
        self.errors.append(SkippedItem(source, reason))

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append(SkippedItem(source, reason))


def snake_key(name: str) -> str:
    """'Facial Hair' / 'faceShape' / 'eye-color' -> 'facial_hair' / 'face_shape' / 'eye_color'."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name).strip())
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def snake_keys(value):
    """`snake_key` applied to every dict key, recursively (annotation values are left as they are)."""
    if isinstance(value, dict):
        return {snake_key(k): snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_keys(v) for v in value]
    return value


def clip_id_from_path(relative_path: str | os.PathLike) -> str:
    """'sub/dir/clip 01.mp4' -> 'sub__dir__clip 01': unique per file, usable as a file name."""
    parts = Path(relative_path).with_suffix("").parts
    return "__".join(parts)


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (each line is one caption)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_json(path: str | os.PathLike):
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(f"not UTF-8 text ({err.reason})") from err


class VideoIndex:
    """All video files under a root, found by relative path or by file name without extension.

    Releases scatter videos over sub-folders (``35666/``, ``videos/part_3/`` ...); walking the tree
    once and looking names up is both simpler and faster than guessing each layout.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                    path = Path(folder, name)
                    self.by_stem[path.stem].append(path)

    def __len__(self) -> int:
        return sum(len(paths) for paths in self.by_stem.values())

    def all_paths(self) -> list[Path]:
        return sorted(p for paths in self.by_stem.values() for p in paths)

    def find(self, name: str, base: Path | None = None) -> Path | None:
        """A relative/absolute path that exists, else a unique file whose stem is `name` (or its stem).

        Raises AnnotationError when several files share the name: picking one would be a guess.
        """
        for folder in (base, self.root):
            if folder is not None and name and (folder / name).is_file():
                return folder / name
        stem = Path(name).stem if Path(name).suffix.lower() in VIDEO_EXTENSIONS else name
        matches = self.by_stem.get(stem, [])
        if len(matches) > 1:
            listed = ", ".join(str(p.relative_to(self.root)) for p in matches)
            raise AnnotationError(f"several videos are named {stem!r}: {listed}")
        return matches[0] if matches else None


def report_path(manifest_path: str | os.PathLike) -> Path:
    """manifest.jsonl -> manifest.report.json."""
    return Path(manifest_path).with_suffix(".report.json")


def finish(result: AdapterResult, out: str | os.PathLike, adapter: str, root: str | os.PathLike,
           echo=print) -> dict:
    """Write the manifest and its report, print the summary; returns the report."""
    manifest = write_manifest(out, result.records)
    report = {
        "adapter": adapter,
        "root": str(Path(root).resolve()),
        "manifest": str(Path(manifest).resolve()),
        "clips_found": result.clips_found,
        "clips_written": len(result.records),
        "clips_missing_on_disk": len(result.missing),
        "annotation_errors": len(result.errors),
        "clips_skipped": len(result.skipped),
        "missing": [{"source": s.source, "reason": s.reason} for s in result.missing],
        "errors": [{"source": s.source, "reason": s.reason} for s in result.errors],
        "skipped": [{"source": s.source, "reason": s.reason} for s in result.skipped],
        "notes": result.notes,
    }
    path = report_path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

    echo(f"[{adapter}] clips found: {report['clips_found']}, written: {report['clips_written']}, "
         f"missing on disk: {report['clips_missing_on_disk']}, annotation errors: {report['annotation_errors']}, "
         f"skipped: {report['clips_skipped']}")
    for title, items in (("missing on disk", result.missing), ("annotation error", result.errors),
                         ("skipped", result.skipped)):
        for item in items[:20]:
            echo(f"  {title}: {item}")
        if len(items) > 20:
            echo(f"  ... {len(items) - 20} more {title}s, see {path}")
    for note in result.notes:
        echo(f"  note: {note}")
    echo(f"[{adapter}] manifest: {manifest}  report: {path}")
    return report
