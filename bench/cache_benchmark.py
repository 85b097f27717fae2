"""The latent cache before and after issue 23, measured side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cache_benchmark.py [--clips 96] [--before 2142d8b]
        [--workers 1] [--encode-batch 8] [--index-clips 270000] [--training]

Prints, on the same FaceVid-Synth clips and VAE:
- cache build clips/s of the code before issue 23 (git ref --before, unpacked with `git archive`: decode on the
  main process, one window per VAE call) and of this tree (decode in --workers DataLoader workers per process,
  --encode-batch windows per VAE call), with 1 and 2 processes (the usual `accelerate launch` of cache.py),
  and the bytes each cache takes;
- reader samples/s (CachedClipDataset items from each cache, one process) and the time to open the cache;
- the index at --index-clips clips (4 windows + flip each, one caption each; synthetic names, no tensors): the
  format-1 reader's dict of every tensor name against this tree's memory-mapped index/, as memory per process,
  memory a forked DataLoader worker copies after one pass over every clip, and open time;
- with --training, also training steps/s encoding on the fly vs. from the cache, and peak RSS of builds of 100
  and 1,000 clips (bounded memory).

Run it with OMP_NUM_THREADS=1 on a shared machine (torch's OpenMP threads spin-wait badly when another process
holds a core); the builds it launches use one thread per process (plus their decode workers).

Uses the demo VAE (runs/demo-vae/vae) when it exists, else an untrained VAE of the same architecture: timings
and sizes do not depend on the weights.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import synth  # noqa: E402
from facevid.config import load_config  # noqa: E402
from models.vae import build_tiny_vae  # noqa: E402

# The demo's FaceVid-Synth clips, as the Makefile generates them.
DEMO_SYNTH = {"num_frames": 16, "resolution": 64, "fps": 12.0}
BEFORE = "2142d8b"  # the commit issue 23's cache work started from

# Run inside a tree (cwd) so that tree's code reads the cache: prints the open time and samples/s.
READER = """
import json, sys, time
from functools import partial
import numpy as np
from data.cache import LatentCache, text_key
from data.dataset import CachedClipDataset
from data.manifest import read_manifest
cache_dir, manifest, encoder, max_length, n = sys.argv[1:]
start = time.perf_counter()
cache = LatentCache(cache_dir)
opened = time.perf_counter() - start
records, _ = read_manifest(manifest)
dataset = CachedClipDataset(records, cache, partial(text_key, encoder_id=encoder, max_length=int(max_length)))
order = np.random.default_rng(0).integers(len(dataset), size=int(n))
dataset[0]
start = time.perf_counter()
for i in order:
    dataset[int(i)]
print(json.dumps({"open_s": opened, "samples_per_s": int(n) / (time.perf_counter() - start)}))
"""


def demo_vae(work: Path, manifest: Path) -> Path:
    trained = REPO / "runs" / "demo-vae" / "vae"
    if trained.is_dir():
        return trained
    cfg = load_config(REPO / "configs" / "demo_vae.yaml", [f"data.manifest={manifest}"])
    vae = build_tiny_vae(cfg.vae.block_out_channels, cfg.vae.layers_per_block, cfg.vae.latent_channels)
    vae.save_pretrained(work / "vae")
    return work / "vae"


def unpack(ref: str, into: Path) -> Path:
    """The repository at `ref`, as files (the code before the change runs from there)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def build_cache_subprocess(tree: Path, manifest: Path, vae: Path, cache: Path, processes: int,
                           *extra: str) -> tuple[dict, float]:
    """Runs tree/cache.py (that tree's code) in a child; returns its report and the child's peak RSS in MB."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    launch += (["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"])
    cmd = launch + [str(tree / "cache.py"), "--config", str(tree / "configs" / "demo.yaml"),
                    f"output_dir={cache.parent / (cache.name + '-run')}", f"data.manifest={manifest}",
                    f"vae.pretrained={vae}", f"data.cache_dir={cache}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=3600)
    if result.returncode:
        sys.exit(f"{tree}/cache.py failed:\n{result.stderr[-3000:]}")
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return json.loads((cache / "report.json").read_text()), peak_mb


def read_speed(tree: Path, cache: Path, manifest: Path, encoder: str, max_length: int, samples: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, "-c", READER, str(cache), str(manifest), encoder, str(max_length),
                             str(samples)], capture_output=True, text=True, env=env, cwd=tree, timeout=1800)
    if result.returncode:
        sys.exit(f"reading {cache} with {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- the index at FaceVid-1K scale
WINDOW_STARTS = (0, 37, 74, 111)


def synthetic_clip(i: int) -> str:
    # 32 characters, like FaceVid-1K's longer ids (YouTube id + segment, TalkingHead-1KH spans)
    return f"{i:08d}_" + hashlib.sha1(str(i).encode()).hexdigest()[:23]


def synthetic_names(clips: int, shard_clips: int = 128):
    """(shard, tensor name) of a format-2 cache of `clips` clips: 4 windows + flips (mean + std), one caption."""
    for i in range(clips):
        clip, shard = synthetic_clip(i), i // shard_clips
        for start in WINDOW_STARTS:
            for flip in (0, 1):
                yield shard, f"latent/{clip}/{start}/{flip}/mean"
                yield shard, f"latent/{clip}/{start}/{flip}/std"
        yield shard, f"text/{hashlib.sha1(clip.encode()).hexdigest()[:24]}/embeds"


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _worker_copy_mb(one_pass) -> list[float]:
    """MB a forked child (a DataLoader worker) turns private: after one pass over every clip, and after a full
    garbage collection too (which writes to every tracked object, torch's own included)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = _memory_kb("Private_Dirty")
        one_pass()
        after_pass = _memory_kb("Private_Dirty")
        gc.collect()
        os.write(write, f"{after_pass - before} {_memory_kb('Private_Dirty') - before}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return [int(kb) / 1024 for kb in os.read(read, 64).split()]


def index_probe(kind: str, clips: int, folder: Path) -> dict:
    """Run in a fresh process per kind (see main): 'old' builds the format-1 reader's structures from the names,
    'build' writes this tree's index/ to `folder`, 'new' maps it."""
    from data.cache import CacheIndex, latent_name

    base = _memory_kb("Rss")
    start = time.perf_counter()
    if kind == "old":
        # The format-1 LatentCache.__init__ loop (git show 2142d8b:data/cache.py), fed the same names.
        where: dict[str, int] = {}
        windows: dict[str, list[tuple[int, int]]] = {}
        for shard_index, name in synthetic_names(clips):
            where[name] = shard_index
            if name.startswith("latent/") and name.endswith("/mean"):
                clip_id, start_, flip, _ = name[len("latent/"):].rsplit("/", 3)
                windows.setdefault(clip_id, []).append((int(start_), int(flip)))
        opened = time.perf_counter() - start

        def one_pass():
            shards = 0
            for i in range(clips):
                clip = synthetic_clip(i)
                for s, f in windows[clip]:
                    shards += where[latent_name(clip, s, f, "mean")]

        return {"open_s": opened, "rss_mb": (_memory_kb("Rss") - base) / 1024, "worker_copy_mb": _worker_copy_mb(one_pass)}
    if kind == "build":
        shards = [f"r0-{i:06d}.safetensors" for i in range((clips + 127) // 128)]
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        for shard in shards:  # empty stand-ins: CacheIndex.load checks the index lists the shards present
            (folder / "shards" / shard).touch()
        index = CacheIndex.from_names(shards, synthetic_names(clips))
        built = time.perf_counter() - start
        index.save(folder)
        return {"build_s": built, "disk_mb": sum(p.stat().st_size for p in (folder / "index").iterdir()) / 2**20}
    index = CacheIndex.load(folder)
    opened = time.perf_counter() - start

    def one_pass():
        shards = 0
        for i in range(clips):
            for _, _, shard in index.windows_of(index.clip_row(synthetic_clip(i))):
                shards += shard

    one_pass()  # page the files in: what a reader that has served an epoch holds
    return {"open_s": opened, "rss_mb": (_memory_kb("Rss") - base) / 1024, "worker_copy_mb": _worker_copy_mb(one_pass)}


def run_probe(kind: str, clips: int, folder: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--index-probe", kind, "--index-clips", str(clips),
                             "--index-folder", str(folder)], capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        sys.exit(f"index probe {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- training (optional, --training)
def steps_per_second(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    first, last = rows[0], rows[-1]  # the first logged step absorbs start-up; measure after it
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def train(manifest: Path, vae: Path, run: Path, steps: int, *extra: str) -> float:
    from facevid.stages import TextToVideoStage
    from facevid.trainer import Trainer

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"output_dir={run}", f"data.manifest={manifest}", f"vae.pretrained={vae}", f"train.max_steps={steps}",
        "train.log_every=1", "train.tracker=none", "train.checkpoint_every=100000", "train.ema_decay=null",
        "train.validation_prompts=[a person talking]", "sample.num_inference_steps=1", *extra])
    Trainer(cfg, TextToVideoStage(cfg)).fit()
    return steps_per_second(run)


def training_section(work: Path, manifest: Path, vae: Path, cache: Path, size: str, steps: int, new: list[str]):
    live = train(manifest, vae, work / "live", steps, "data.cache=none", size)
    cached = train(manifest, vae, work / "cached", steps, f"data.cache_dir={cache}", "data.cache=use", size)
    rss = {}
    s = DEMO_SYNTH
    for count in (100, 1000):
        many = synth.generate(work / f"synth{count}", num_clips=count, num_frames=s["num_frames"],
                              resolution=s["resolution"], fps=s["fps"], seed=7, progress=False)
        _, rss[count] = build_cache_subprocess(REPO, many, vae, work / f"rss{count}", 1, size, *new)
    print("\n| training (this tree) | value |\n|---|---|")
    print(f"| steps/s, encoding on the fly | {live:.2f} |")
    print(f"| steps/s, from the cache | {cached:.2f} ({cached / live:.2f}x) |")
    print(f"| peak RSS building 100 / 1,000 clips | {rss[100]:.0f} MB / {rss[1000]:.0f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=96, help="clips for the build and reader measurements")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (the demo trains at 32)")
    parser.add_argument("--before", default=BEFORE, help="git ref of the code to compare with")
    parser.add_argument("--workers", type=int, default=1, help="decode workers per process (data.num_workers)")
    parser.add_argument("--encode-batch", type=int, help="windows per VAE call (data.cache_encode_batch; default: "
                        "the config's default, 1 on a CPU)")
    parser.add_argument("--samples", type=int, default=2000, help="items read for the reader speed")
    parser.add_argument("--index-clips", type=int, default=270_000, help="clips of the synthetic index (0: skip)")
    parser.add_argument("--training", action="store_true", help="also training steps/s and build peak RSS")
    parser.add_argument("--steps", type=int, default=40, help="training steps per mode (--training)")
    parser.add_argument("--index-probe", help=argparse.SUPPRESS)
    parser.add_argument("--index-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index_probe:
        print(json.dumps(index_probe(args.index_probe, args.index_clips, Path(args.index_folder))))
        return
    size = f"data.resolution={args.resolution}"
    new = [f"data.num_workers={args.workers}"]
    if args.encode_batch:
        new.append(f"data.cache_encode_batch={args.encode_batch}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        s = DEMO_SYNTH
        manifest = synth.generate(work / "synth", num_clips=args.clips, num_frames=s["num_frames"],
                                  resolution=s["resolution"], fps=s["fps"], seed=0, progress=False)
        demo = load_config(REPO / "configs" / "demo.yaml", ["vae.pretrained=null", "stage=vae", "data.cache=none",
                                                            f"data.manifest={manifest}", size])
        vae = demo_vae(work, manifest)
        before_tree = unpack(args.before, work / "before")

        builds = {}
        for processes in (1, 2):  # before and after back to back, so both see the same machine load
            builds["before", processes] = build_cache_subprocess(
                before_tree, manifest, vae, work / f"before{processes}", processes, size)[0]
            builds["after", processes] = build_cache_subprocess(
                REPO, manifest, vae, work / f"after{processes}", processes, size, *new)[0]
        encoder, max_length = demo.text_encoder.pretrained, demo.text_encoder.max_length
        reads = {kind: read_speed(tree, work / f"{kind}1", manifest, encoder, max_length, args.samples)
                 for kind, tree in (("before", before_tree), ("after", REPO))}
        index = {}
        if args.index_clips:
            index["build"] = run_probe("build", args.index_clips, work / "index")
            index["old"] = run_probe("old", args.index_clips, work / "index")
            index["new"] = run_probe("new", args.index_clips, work / "index")

        print(f"\nFaceVid cache benchmark: demo config ({args.resolution} px, {demo.data.num_frames} frames, "
              f"{demo.data.cache_windows_per_clip} window per clip, posterior mean only, "
              f"{max_length}-token captions), {args.clips} FaceVid-Synth clips, {os.cpu_count()} CPU cores "
              f"(load average {os.getloadavg()[0]:.1f} at the end); before = {args.before}, after = this tree "
              f"with {args.workers} decode worker(s) per process and {args.encode_batch or 'the default'} window(s) per "
              "VAE call\n")
        print("| measurement | before | after | after / before |\n|---|---|---|---|")
        for processes in (1, 2):
            a, b = builds["before", processes]["clips_per_second"], builds["after", processes]["clips_per_second"]
            print(f"| cache build, {processes} process(es), clips/s | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
        a, b = (builds[k, 1]["bytes_written"] / args.clips / 1024 for k in ("before", "after"))
        print(f"| cache KiB per clip (fp16, with its captions) | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
        a, b = reads["before"]["samples_per_s"], reads["after"]["samples_per_s"]
        print(f"| reader samples/s (CachedClipDataset, 1 process) | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
        a, b = reads["before"]["open_s"] * 1e3, reads["after"]["open_s"] * 1e3
        print(f"| opening the cache, ms | {a:.1f} | {b:.1f} | |")
        if index:
            old, new_, built = index["old"], index["new"], index["build"]
            print(f"\nIndex of {args.index_clips:,} clips x {len(WINDOW_STARTS)} windows x 2 flips + 1 caption each "
                  f"(synthetic names; before = the format-1 reader's dict of every tensor name, after = index/):\n")
            print("| measurement | before (dict) | after (index/) |\n|---|---|---|")
            print(f"| memory per process, MB | {old['rss_mb']:.0f} | {new_['rss_mb']:.0f} (page cache, shared; "
                  f"{built['disk_mb']:.0f} MB on disk) |")
            print(f"| copied by a forked worker: one pass over every clip, MB | {old['worker_copy_mb'][0]:.0f} | "
                  f"{new_['worker_copy_mb'][0]:.1f} |")
            print(f"| ... and then a full garbage collection, MB | {old['worker_copy_mb'][1]:.0f} | "
                  f"{new_['worker_copy_mb'][1]:.1f} |")
            print(f"| open, s | {old['open_s']:.1f} (from names already read) | {new_['open_s']:.3f} "
                  f"(written once at build end in {built['build_s']:.1f} s) |")
        if args.training:
            training_section(work, manifest, vae, work / "after1", size, args.steps, new)


if __name__ == "__main__":
    main()
