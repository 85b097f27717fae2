"""What the latent cache buys, measured side by side on the demo configuration.

    .venv/bin/python bench/cache_benchmark.py [--steps 40] [--clips 128] [--resolution 64]

Prints: training steps/s encoding on the fly vs. reading the cache (and the ratio); cache build
clips/s with 1 and 2 processes; bytes per clip per frame at the demo resolution and extrapolated to
FaceVid-1K; peak RSS while building the cache for 100 vs 1,000 clips.

Run it with OMP_NUM_THREADS=1 on a shared machine (torch's OpenMP threads spin-wait badly when
another process holds a core); the cache builds it launches use one thread per process.

Uses the demo VAE (runs/demo-vae/vae) when it exists, else an untrained VAE of the same architecture:
timings and sizes do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import synth  # noqa: E402
from facevid.config import load_config  # noqa: E402
from facevid.stages import TextToVideoStage  # noqa: E402
from facevid.trainer import Trainer  # noqa: E402
from models.vae import build_tiny_vae  # noqa: E402

# The demo's FaceVid-Synth clips, as the Makefile generates them.
DEMO_SYNTH = {"num_frames": 16, "resolution": 64, "fps": 12.0}


def demo_vae(work: Path, manifest: Path) -> Path:
    trained = REPO / "runs" / "demo-vae" / "vae"
    if trained.is_dir():
        return trained
    cfg = load_config(REPO / "configs" / "demo_vae.yaml", [f"data.manifest={manifest}"])
    vae = build_tiny_vae(cfg.vae.block_out_channels, cfg.vae.layers_per_block, cfg.vae.latent_channels)
    vae.save_pretrained(work / "vae")
    return work / "vae"


def steps_per_second(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    first, last = rows[0], rows[-1]  # the first logged step absorbs start-up; measure after it
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def train(manifest: Path, vae: Path, run: Path, steps: int, *extra: str) -> float:
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"output_dir={run}", f"data.manifest={manifest}", f"vae.pretrained={vae}", f"train.max_steps={steps}",
        "train.log_every=1", "train.tracker=none", "train.checkpoint_every=100000", "train.ema_decay=null",
        "train.validation_prompts=[a person talking]", "sample.num_inference_steps=1", *extra])
    Trainer(cfg, TextToVideoStage(cfg)).fit()
    return steps_per_second(run)


def build_cache_subprocess(manifest: Path, vae: Path, cache: Path, processes: int,
                           *extra: str) -> tuple[dict, float]:
    """Runs cache.py in a child; returns its report and the child's peak RSS in MB."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    launch += (["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"])
    cmd = launch + [str(REPO / "cache.py"), "--config", str(REPO / "configs" / "demo.yaml"),
                    f"output_dir={cache.parent / 'run'}", f"data.manifest={manifest}", f"vae.pretrained={vae}",
                    f"data.cache_dir={cache}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        sys.exit(f"cache.py failed:\n{result.stderr[-3000:]}")
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return json.loads((cache / "report.json").read_text()), peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per mode")
    parser.add_argument("--clips", type=int, default=128, help="clips for the speed measurements")
    parser.add_argument("--resolution", type=int, default=64,
                        help="training resolution (the README's figures: 64; the demo itself trains at 32)")
    args = parser.parse_args()
    size = f"data.resolution={args.resolution}"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        s = DEMO_SYNTH
        manifest = synth.generate(work / "synth", num_clips=args.clips, num_frames=s["num_frames"],
                                  resolution=s["resolution"], fps=s["fps"], seed=0, progress=False)
        demo = load_config(REPO / "configs" / "demo.yaml", ["vae.pretrained=null", "stage=vae", "data.cache=none",
                                                            f"data.manifest={manifest}", size])
        vae = demo_vae(work, manifest)

        rows = []
        for processes in (1, 2):
            report, _ = build_cache_subprocess(manifest, vae, work / f"cache{processes}", processes, size)
            rows.append((processes, report))
        live = train(manifest, vae, work / "live", args.steps, "data.cache=none", size)
        cached = train(manifest, vae, work / "cached", args.steps, f"data.cache_dir={work / 'cache1'}",
                       "data.cache=use", size)

        per_clip = rows[0][1]["bytes_written"] / args.clips
        frames = demo.data.num_frames
        # Latent bytes: posterior mean + std, fp16, per window (with the demo's one window per clip).
        rss = {}
        for count in (100, 1000):
            many = synth.generate(work / f"synth{count}", num_clips=count, num_frames=s["num_frames"],
                                  resolution=s["resolution"], fps=s["fps"], seed=7, progress=False)
            _, rss[count] = build_cache_subprocess(many, vae, work / f"rss{count}", 1, size)

    print(f"\nFaceVid cache benchmark: demo config ({demo.data.resolution} px, {frames} frames, VAE factor 4, "
          f"{args.clips} clips), {os.cpu_count()} CPU cores\n")
    print("| measurement | value |\n|---|---|")
    print(f"| training steps/s, encoding on the fly | {live:.2f} |")
    print(f"| training steps/s, from the cache | {cached:.2f} |")
    print(f"| speed-up from the cache | {cached / live:.2f}x |")
    for processes, report in rows:
        print(f"| cache build, {processes} process(es) | {report['clips_per_second']:.1f} clips/s |")
    print(f"| 2-process build scaling | {rows[1][1]['clips_per_second'] / rows[0][1]['clips_per_second']:.2f}x |")
    print(f"| cache bytes per clip (fp16, 1 window, with its captions) | {per_clip / 1024:.1f} KiB |")
    print(f"| cache bytes per clip per frame | {per_clip / frames / 1024:.2f} KiB |")
    print(f"| peak RSS building 100 clips | {rss[100]:.0f} MB |")
    print(f"| peak RSS building 1,000 clips | {rss[1000]:.0f} MB |")

    print("\nExtrapolated to FaceVid-1K (270,000 clips, 16 frames, SD VAE: 4 channels, factor 8, fp16 "
          "mean + std; captions not included):\n")
    print("| resolution | latent per window | 1 window per clip | 4 windows per clip | 4 windows + flip |")
    print("|---|---|---|---|---|")
    for res in (256, 512):
        window = 4 * 16 * (res // 8) ** 2 * 2 * 2
        gigabytes = [270_000 * windows * window / 1e9 for windows in (1, 4, 8)]
        print(f"| {res} | {window / 1024:.0f} KiB | " + " | ".join(f"{g:.0f} GB" for g in gigabytes) + " |")


if __name__ == "__main__":
    main()
