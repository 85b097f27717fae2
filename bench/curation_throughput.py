"""Curation throughput: seconds of raw video curated per second of wall time, 1 and 2 processes.

    .venv/bin/python bench/curation_throughput.py [--minutes 3] [--files 9] [--size 640x360] [--fps 25]

Builds a raw corpus from scikit-image's real photographs (camera pans over the astronaut portrait,
some talking, LFW faces, non-face scenes, hard cuts between them), then runs the default curation
(256 px clips at 25 fps, Haar detection every 5 frames) on it once per process count, from scratch.
Also times decoding alone, to show how much of the cost is the decoder.

Rates are given per wall second and per CPU second (user + system time of every process): on a shared
machine other work inflates wall time but not CPU time. The extrapolation to a 2,000-hour corpus
assumes a 32-core node running one process per core with linear scaling (files share nothing, so
only memory bandwidth and disk could bend it), and raw video costing what this corpus costs per
second (640x360 H.264); 1080p sources decode several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.curate import CurationConfig, iter_frames, run_curation
from data.curate.synthetic import Shot, face_shot, lfw_face, scene_shot, shot_frames, write_stream

TARGET_HOURS = 2000
NODE_CORES = 32


def build_corpus(folder: Path, files: int, seconds_per_file: float, size: tuple[int, int], fps: float) -> float:
    """Files of random shot sequences, about 70% face footage; returns the total seconds written."""
    rng = random.Random(0)
    total = 0.0
    for index in range(files):
        shots, length = [], 0.0
        while length < seconds_per_file:
            seconds = min(rng.uniform(2.0, 8.0), seconds_per_file - length + 0.5)
            pick = rng.random()
            if pick < 0.6:
                shot = face_shot(seconds, pan=rng.uniform(-60, 60), zoom=rng.uniform(0.7, 1.0),
                                 talking=rng.random() < 0.5)
            elif pick < 0.7:
                shot = Shot(lfw_face(rng.randrange(100)), seconds, (0, 0, 320), (rng.uniform(0, 20), 0, 300))
            else:
                shot = scene_shot(rng.choice(["coffee", "chelsea", "rocket", "astronaut"]), seconds)
            shots.append(shot)
            length += shot.seconds
        write_stream(folder / f"raw_{index:03d}.mp4", shot_frames(shots, size, fps), fps)
        total += round(length * fps) / fps
    return total


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def decode_only(folder: Path) -> float:
    started = time.perf_counter()
    for path in sorted(folder.glob("*.mp4")):
        for _ in iter_frames(path):
            pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="raw video to build")
    parser.add_argument("--files", type=int, default=9)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--workers", default="1,2", help="process counts to time")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    config = CurationConfig()  # the defaults a user gets

    with tempfile.TemporaryDirectory(prefix="curation_bench_") as tmp:
        raw = Path(tmp, "raw")
        raw.mkdir()
        started = time.perf_counter()
        seconds = build_corpus(raw, args.files, args.minutes * 60 / args.files, size, args.fps)
        print(f"corpus: {args.files} files, {seconds:.0f} s of {args.size} @ {args.fps:g} fps "
              f"(built in {time.perf_counter() - started:.0f} s)")
        decode_wall = decode_only(raw)
        print(f"decode only (1 process): {seconds / decode_wall:.1f} s of video per s")

        load_before = os.getloadavg()[0]
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(tmp, f"out_{workers}")
            started, cpu_started = time.perf_counter(), cpu_seconds()
            report = run_curation([raw], out, config, workers=workers, echo=lambda *_: None)
            wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
            lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
            busy = sum(json.loads(line)["wall_seconds"] for line in lines)
            summary = report["summary"]
            rows.append((workers, wall, seconds / wall, seconds / busy, seconds / cpu, summary["clips"],
                         summary["clip_seconds"]))

    print(f"\nmachine: {os.cpu_count()} cores; 1-minute load average {load_before:.2f} before the runs, "
          f"{os.getloadavg()[0]:.2f} after (other work on a shared machine slows every number)")
    print(f"config: {config.out_size} px clips at {config.fps:g} fps, detector every {config.detect_every} frames\n")
    print("| processes | wall (s) | video s / wall s | per process | per busy worker s | per CPU s | clips kept "
          "| clip s |")
    print("|---|---|---|---|---|---|---|---|")
    for workers, wall, rate, busy_rate, cpu_rate, clips, kept in rows:
        print(f"| {workers} | {wall:.1f} | {rate:.2f} | {rate / workers:.2f} | {busy_rate:.2f} | {cpu_rate:.2f} "
              f"| {clips} | {kept:.0f} |")
    print("(busy worker s: time workers spent on files, without process start-up, which a long run amortises; "
          "CPU s: user + system time of all processes, which other work on the machine does not inflate)")
    single = rows[0][2] / rows[0][0]
    if len(rows) > 1:
        workers, _, rate = rows[-1][:3]
        scaling = rate / rows[0][2]
        print(f"\n{workers}-process scaling: {scaling:.2f}x ({scaling / (workers / rows[0][0]):.0%} of linear)")
    if load_before > (os.cpu_count() or 1) - 0.5:
        print(f"note: the machine was already busy (load {load_before:.1f} on {os.cpu_count()} cores): wall-time "
              "rates and scaling mostly reflect the other work; the CPU-time rate does not")
    cpu_rate = min(row[4] for row in rows)  # the most CPU any run needed per video second
    for label, rate in (("wall time of 1 process", single), ("CPU time", cpu_rate)):
        node_rate = rate * NODE_CORES
        hours = TARGET_HOURS / node_rate
        print(f"extrapolation from {label}: {TARGET_HOURS:,} h of raw {args.size} video on a {NODE_CORES}-core node, "
              f"one process per core scaling linearly ({NODE_CORES} x {rate:.2f} = {node_rate:.0f} video s per s): "
              f"{hours:.1f} h")

if __name__ == "__main__":
    main()
