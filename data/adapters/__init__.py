"""Dataset adapters: each turns a dataset release into the one manifest format (data/manifest.py).

    python -m data.adapters {facevid1k,easyanimate,celebvhq,celebvtext,folder,csv} --root ROOT --out manifest.jsonl

`run_adapter` is the same from Python. Each run writes the manifest and ``manifest.report.json`` (clips
found, written, missing on disk, annotation errors and skipped, each named with the reason).
"""

from __future__ import annotations

from pathlib import Path

from data.adapters.celebv import adapt_celebvhq, adapt_celebvtext
from data.adapters.common import AdapterResult, VideoIndex, finish, report_path
from data.adapters.easyanimate import adapt as adapt_easyanimate
from data.adapters.facevid1k import adapt as adapt_facevid1k
from data.adapters.generic import adapt_csv, adapt_folder

ADAPTERS = ("facevid1k", "easyanimate", "celebvhq", "celebvtext", "folder", "csv")

__all__ = [
    "ADAPTERS",
    "AdapterResult",
    "adapt_celebvhq",
    "adapt_celebvtext",
    "adapt_csv",
    "adapt_easyanimate",
    "adapt_facevid1k",
    "adapt_folder",
    "report_path",
    "run_adapter",
]


def _find_csv(root: Path) -> Path:
    if root.is_file():
        return root
    tables = sorted(root.glob("*.csv"))
    if len(tables) != 1:
        raise FileNotFoundError(f"expected one .csv in {root} (found {len(tables)}); pass --csv")
    return tables[0]


def _note_unannotated(result: AdapterResult, root: Path) -> None:
    """Videos on disk that no annotation points at are not clips, but the report says they exist."""
    if not root.is_dir():
        return
    used = {Path(r.video).resolve() for r in result.records}
    unused = [p for p in VideoIndex(root).all_paths() if p.resolve() not in used]
    if unused:
        examples = ", ".join(str(p.relative_to(root)) for p in unused[:5])
        result.notes.append(f"{len(unused)} video files under the root have no annotation (e.g. {examples})")


def _probe(result: AdapterResult) -> None:
    """Opens every video: undecodable ones become errors, and fps is filled in from the container."""
    from data.video import VideoDecodeError, probe_video  # imports torch: only when asked for

    readable = []
    for record in result.records:
        try:
            info = probe_video(record.video)
        except VideoDecodeError as err:
            result.error(record.video, f"clip {record.clip_id!r}: {err.reason}")
            continue
        if record.fps is None and info.fps:
            record.fps = info.fps
        readable.append(record)
    result.records = readable


def run_adapter(name: str, root: str | Path, out: str | Path, *, annotations=None, info=None, texts=None,
                csv_path=None, videos_mode: str = "auto", allow_uncaptioned: bool = False,
                probe: bool = False, keep_images: bool = False, echo=print) -> dict:
    """Run one adapter, write the manifest and its report; returns the report dict."""
    root, out = Path(root), Path(out)
    if name == "facevid1k":
        result = adapt_facevid1k(root, Path(annotations) if annotations else None,
                                 exclude={out.resolve(), report_path(out).resolve()})
    elif name == "easyanimate":
        result = adapt_easyanimate(root, Path(annotations) if annotations else None, keep_images=keep_images,
                                   allow_uncaptioned=allow_uncaptioned,
                                   exclude={out.resolve(), report_path(out).resolve()})
    elif name == "celebvhq":
        result = adapt_celebvhq(root, Path(info) if info else None, videos_mode)
    elif name == "celebvtext":
        result = adapt_celebvtext(root, Path(info) if info else None, Path(texts) if texts else None,
                                  videos_mode)
    elif name == "folder":
        result = adapt_folder(root, allow_uncaptioned)
    elif name == "csv":
        table = Path(csv_path) if csv_path else _find_csv(root)
        result = adapt_csv(table, root=table.parent)
        root = table.parent
    else:
        raise ValueError(f"unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}")
    if probe:
        _probe(result)
    _note_unannotated(result, root)
    return finish(result, out, name, root, echo=echo)
