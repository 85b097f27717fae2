"""Many input files: parallel workers, resume after interruption, manifest and report.

Progress lives in ``OUT/results.jsonl``: one line per finished input (kept, dropped or error, with its
clip records), appended and fsynced by the parent process only, so a crash loses at most the inputs
in flight. A re-run skips every input already there (unless the file changed since) and rebuilds
``manifest.jsonl`` and ``report.json`` from all lines.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from data.adapters.common import VIDEO_EXTENSIONS
from data.curate.captions import load_captioner
from data.curate.faces import load_detector
from data.curate.pipeline import DETECTABLE_FACE_SHARE, CurationConfig, curate_video
from data.manifest import parse_line, write_manifest

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "curation_config.json"
LIST_EXTENSIONS = (".txt", ".lst", ".list")


class ConfigMismatch(RuntimeError):
    """The output folder was started with other settings; mixing them would make a muddled dataset."""


# ----------------------------------------------------------------------------- inputs


def list_inputs(specs: list[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """(videos to process, files skipped for lacking a video extension) from folders, lists, files.

    A folder is searched recursively; a .txt/.lst/.list file names one video per line (relative to
    the list's folder); anything else is taken as a video, even if missing (it is then reported).
    """
    videos: list[Path] = []
    ignored: list[str] = []
    for spec in map(Path, specs):
        if spec.is_dir():
            for folder, dirs, files in os.walk(spec):
                dirs.sort()
                for name in sorted(files):
                    target = videos if name.lower().endswith(VIDEO_EXTENSIONS) else ignored
                    target.append(Path(folder, name))
        elif spec.suffix.lower() in LIST_EXTENSIONS and spec.is_file():
            for line in spec.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    entry = Path(line.strip())
                    videos.append(entry if entry.is_absolute() else spec.parent / entry)
        else:
            videos.append(spec)
    unique = list(dict.fromkeys(p.resolve() for p in videos))
    return unique, [str(p) for p in ignored]


def _fingerprint(path: Path) -> dict:
    try:
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        return {"size": None, "mtime_ns": None}


# ----------------------------------------------------------------------------- results file


def _drop_torn_tail(path: Path) -> None:
    """A crash in the middle of an append leaves a line without its newline: cut it off."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def load_results(path: Path) -> dict[str, dict]:
    results = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue  # only a torn line can be bad, and its input is simply redone
            results[result["input"]] = result  # a later line (a redo) wins
    return results


def append_result(path: Path, result: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- workers

_WORKER_CACHE: dict = {}


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only contend


def process_input(path: str, out_dir: str, config: dict) -> dict:
    """Worker entry point (top level so it pickles): curate one file, never raise."""
    cfg = CurationConfig(**config)
    key = (cfg.detector, cfg.captioner, cfg.min_face)
    if key not in _WORKER_CACHE:  # models load once per process, not once per file
        _WORKER_CACHE[key] = (load_detector(cfg.detector, DETECTABLE_FACE_SHARE * cfg.min_face),
                              load_captioner(cfg.captioner))
    detector, captioner = _WORKER_CACHE[key]
    fingerprint = _fingerprint(Path(path))
    try:
        result = curate_video(path, out_dir, cfg, detector, captioner)
    except Exception as err:  # noqa: BLE001 -- a bug or an exotic file must cost this input only
        result = {"input": path, "status": "error", "clips": [], "warnings": [], "seconds": 0.0,
                  "reason": f"internal error ({err.__class__.__name__}: {err})"}
    return result | fingerprint


def _run_in_pool(todo: list[Path], out_dir: Path, cfg: CurationConfig, workers: int,
                 record: Callable[[dict], None]) -> list[Path]:
    """Runs `todo` on `workers` processes; returns the inputs lost to a dead worker process."""
    context = multiprocessing.get_context("spawn")  # fork after OpenCV/torch threads exist can deadlock
    lost = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(process_input, str(p), str(out_dir), cfg.to_dict()): p for p in todo}
        for future in as_completed(futures):
            try:
                record(future.result())
            except BrokenProcessPool:
                lost.append(futures[future])
    return lost


# ----------------------------------------------------------------------------- the run


def _check_config(out_dir: Path, cfg: CurationConfig, redo: bool) -> None:
    config_path = out_dir / CONFIG_FILE
    results_path = out_dir / RESULTS_FILE
    if redo:
        results_path.unlink(missing_ok=True)
        for clip in (out_dir / "clips").glob("*.mp4"):
            clip.unlink()
    elif config_path.exists() and results_path.exists():
        previous = json.loads(config_path.read_text(encoding="utf-8"))
        changed = {k: (previous.get(k), v) for k, v in cfg.to_dict().items() if previous.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigMismatch(f"{out_dir} was curated with other settings ({listed}); use another --out, "
                                 "the same settings, or --redo to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")


def run_curation(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, config: CurationConfig,
                 workers: int = 1, redo: bool = False, limit: int | None = None, echo=print) -> dict:
    """Curate every input not finished yet, then rebuild manifest.jsonl and report.json; returns the report.

    `limit` stops after that many inputs (the rest stay pending for the next run).
    """
    out_dir = Path(out_dir)
    _check_config(out_dir, config, redo)
    results_path = out_dir / RESULTS_FILE
    _drop_torn_tail(results_path)
    videos, ignored = list_inputs(inputs)
    done = load_results(results_path)
    todo = [p for p in videos if str(p) not in done
            or {k: done[str(p)].get(k) for k in ("size", "mtime_ns")} != _fingerprint(p)]
    skipped = len(videos) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    echo(f"[curate] {len(videos)} inputs: {skipped} already done, {len(todo)} to process "
         f"with {workers} worker{'s' * (workers > 1)}")

    started = time.perf_counter()
    finished = 0

    def record(result: dict) -> None:
        nonlocal finished
        append_result(results_path, result)
        finished += 1
        what = f"{len(result['clips'])} clips" if result["status"] == "kept" else result["reason"]
        echo(f"[curate] {finished}/{len(todo)} {result['status']}: {Path(result['input']).name} ({what})")

    if workers <= 1:
        _init_worker()
        for path in todo:
            record(process_input(str(path), str(out_dir), config.to_dict()))
    else:
        lost = _run_in_pool(todo, out_dir, config, workers, record)
        for path in lost:  # retry alone: only the input that kills its worker should fail
            if _run_in_pool([path], out_dir, config, 1, record):
                record({"input": str(path), "status": "error", "clips": [], "warnings": [], "seconds": 0.0,
                        "reason": "worker process died while processing this file (decoder crash or "
                                  "out of memory)"} | _fingerprint(path))
    wall = time.perf_counter() - started
    return write_outputs(out_dir, ignored, wall, echo)


def write_outputs(out_dir: Path, ignored: list[str], wall_seconds: float, echo=print) -> dict:
    """manifest.jsonl and report.json from every result so far (this run's and earlier ones)."""
    results = load_results(out_dir / RESULTS_FILE)
    records = [parse_line(clip, out_dir) for result in results.values() for clip in result["clips"]]
    write_manifest(out_dir / "manifest.jsonl", records)
    statuses = Counter(r["status"] for r in results.values())
    dropped_seconds: Counter = Counter()
    dropped_clips: Counter = Counter()
    for result in results.values():
        dropped_seconds.update(result.get("dropped_seconds", {}))
        dropped_clips.update(result.get("dropped_clips", {}))
    input_seconds = sum(r.get("seconds", 0.0) for r in results.values())
    summary = {
        "inputs": len(results), "kept": statuses["kept"], "dropped": statuses["dropped"],
        "errors": statuses["error"], "clips": len(records),
        "input_seconds": round(input_seconds, 2),
        "clip_seconds": round(sum(r.get("kept_seconds", 0.0) for r in results.values()), 2),
        "dropped_seconds": {k: round(v, 2) for k, v in dropped_seconds.most_common()},
        "dropped_clips": dict(dropped_clips.most_common()),
        "ignored_files": len(ignored),
        "last_run_wall_seconds": round(wall_seconds, 2),
    }
    report = {
        "config": json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8")),
        "summary": summary,
        "inputs": [{"input": r["input"], "status": r["status"], "reason": r.get("reason"),
                    "clips": [c["id"] for c in r["clips"]], "seconds": r.get("seconds", 0.0),
                    "dropped_seconds": r.get("dropped_seconds", {}), "dropped_clips": r.get("dropped_clips", {}),
                    "warnings": r.get("warnings", [])} for r in results.values()],
        "ignored_files": ignored,
    }
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "report.json")

    echo(f"[curate] inputs {summary['inputs']}: kept {summary['kept']}, dropped {summary['dropped']}, "
         f"errors {summary['errors']}; clips {summary['clips']} ({summary['clip_seconds']:.1f} s of "
         f"{summary['input_seconds']:.1f} s decoded)")
    for reason, seconds in summary["dropped_seconds"].items():
        clips = summary["dropped_clips"].get(reason)
        echo(f"  dropped {reason}: {seconds:.1f} s" + (f" in {clips} clips" if clips else ""))
    for entry in report["inputs"]:
        if entry["status"] == "error":
            echo(f"  error: {entry['input']}: {entry['reason']}")
    if ignored:
        echo(f"  ignored {len(ignored)} files without a video extension (listed in report.json)")
    echo(f"[curate] manifest: {out_dir / 'manifest.jsonl'}  report: {out_dir / 'report.json'}")
    return report
