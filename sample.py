"""Generate face videos from prompts with a trained run.

    python sample.py --run runs/demo --prompt "a person with red hair talking" --seed 0

Writes an mp4, a gif and a PNG contact sheet per prompt (plus all.png) and prints their paths.
Same run, prompt, seed, scheduler and steps -> the same video.
"""

import argparse
import sys
from pathlib import Path

import torch

from facevid.pipeline import FaceVidPipeline, write_samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by train.py (stage t2v)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file, one prompt per line")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="number of denoising steps")
    parser.add_argument("--scheduler", choices=["dpm++", "ddim"], default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="default: the training clip length")
    parser.add_argument("--resolution", type=int, default=None, help="default: the training resolution")
    parser.add_argument("--fps", type=float, default=None)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/samples/cli)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts-file")
    try:
        pipe = FaceVidPipeline.from_run(args.run, use_ema=not args.no_ema, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = pipe.run_config
    pick = lambda value, default: default if value is None else value  # noqa: E731
    videos = pipe(
        prompts,
        negative_prompt=pick(args.negative_prompt, cfg.sample.negative_prompt),
        num_frames=pick(args.frames, cfg.data.num_frames),
        resolution=pick(args.resolution, cfg.data.resolution),
        num_inference_steps=pick(args.steps, cfg.sample.num_inference_steps),
        guidance_scale=pick(args.guidance_scale, cfg.sample.guidance_scale),
        scheduler=pick(args.scheduler, cfg.sample.scheduler),
        seed=pick(args.seed, cfg.sample.seed),
        progress=True,
    )
    out = Path(args.out) if args.out else Path(args.run) / "samples" / "cli"
    paths = write_samples(videos, prompts, out, fps=pick(args.fps, cfg.sample.fps))
    print(f"{len(prompts)} video(s) from {pipe.weights} weights written to {out}:")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
