"""Generate face videos with a trained run, whatever its task (config.yaml's `task`):

    python sample.py --run runs/demo --prompt "a person with red hair talking" --seed 0      # t2v
    python sample.py --run runs/i2v --image face.png --prompt "a person talking"             # i2v
    python sample.py --run runs/i2v --image clip.mp4 --image-frame 12 --prompt "..."         # i2v, a video frame
    python sample.py --run runs/uncond --num-videos 4                                        # uncond
    python sample.py --run runs/demo --prompts-file configs/demo_prompts.txt --same-seed     # one noise for all

Writes an mp4, a gif and a PNG contact sheet per video (plus all.png) and prints their paths. A request the
run's task cannot serve (an image for t2v, none for i2v, a prompt for uncond) is refused with what to give.
Same run, inputs, seed, scheduler and steps -> the same video.
"""

import argparse
import sys
from pathlib import Path

import torch

from data.video import VideoDecodeError
from facevid.pipeline import FaceVidPipeline, load_first_frame, write_samples
from facevid.stages.common import training_fps
from facevid.tasks import check_request


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by train.py (stage t2v)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file, one prompt per line")
    parser.add_argument("--image", help="i2v runs: the first frame, an image file or a video (see --image-frame)")
    parser.add_argument("--image-frame", type=int, default=None, help="with a video --image: the frame index")
    parser.add_argument("--num-videos", type=int, default=1,
                        help="videos per prompt (seeds seed, seed+1, ...); uncond runs: the number of videos")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--guidance-rescale", type=float, default=None,
                        help="CFG rescale phi in [0, 1] (Lin et al. 2023; default: the run's sample.guidance_rescale)")
    parser.add_argument("--steps", type=int, default=None, help="number of denoising steps")
    parser.add_argument("--scheduler", choices=["dpm++", "ddim"], default=None)
    parser.add_argument("--seed", type=int, default=None, help="prompt i gets seed + i (default: the run's sample.seed)")
    parser.add_argument("--same-seed", action="store_true",
                        help="every prompt gets the same seed, so prompts that differ in one word differ only by it")
    parser.add_argument("--frames", type=int, default=None, help="default: the training clip length")
    parser.add_argument("--resolution", type=int, default=None, help="default: the training resolution")
    parser.add_argument("--fps", type=float, default=None,
                        help="default: the run's sample.fps, i.e. the fps its model was trained at")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/samples/cli)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if args.num_videos < 1:
        parser.error("--num-videos must be >= 1")
    if args.guidance_rescale is not None and not 0.0 <= args.guidance_rescale <= 1.0:
        parser.error("--guidance-rescale must be in [0, 1] (0 = off)")
    if args.image_frame is not None and not args.image:
        parser.error("--image-frame needs --image")
    if args.same_seed and not prompts:
        parser.error("--same-seed needs prompts: it gives every prompt the same noise")
    try:
        pipe = FaceVidPipeline.from_run(args.run, use_ema=not args.no_ema, device=args.device)
        check_request(pipe.task, bool(prompts), bool(args.image), source=f"run {args.run}")
        cfg = pipe.run_config
        resolution = args.resolution or cfg.data.resolution
        image = load_first_frame(args.image, resolution, args.image_frame) if args.image else None
    except (OSError, ValueError, VideoDecodeError) as err:  # missing / unreadable files, task mismatches
        print(f"error: {err}", file=sys.stderr)
        return 2
    pick = lambda value, default: default if value is None else value  # noqa: E731
    seed = pick(args.seed, cfg.sample.seed)
    if pipe.task == "uncond":
        labels = [f"unconditional {i}" for i in range(args.num_videos)]
    else:  # an i2v run may be given an image alone: it is then sampled with the empty prompt
        if args.same_seed:  # repeat k of every prompt gets seed + k
            seed = [seed + k for _ in prompts for k in range(args.num_videos)]
        prompts = [p for p in (prompts or [""]) for _ in range(args.num_videos)]
        labels = [p or f"image {Path(args.image).stem}" for p in prompts]
    videos = pipe(
        prompts,
        images=None if image is None else image[None].expand(len(prompts), -1, -1, -1),
        num_videos=len(labels),
        negative_prompt=pick(args.negative_prompt, cfg.sample.negative_prompt),
        num_frames=pick(args.frames, cfg.data.num_frames),
        resolution=resolution,
        num_inference_steps=pick(args.steps, cfg.sample.num_inference_steps),
        guidance_scale=pick(args.guidance_scale, cfg.sample.guidance_scale),
        guidance_rescale=args.guidance_rescale,
        scheduler=pick(args.scheduler, cfg.sample.scheduler),
        seed=seed,
        progress=True,
    )
    out = Path(args.out) if args.out else Path(args.run) / "samples" / "cli"
    paths = write_samples(videos, labels, out, fps=pick(args.fps, training_fps(cfg)))  # training_fps: sample.fps if set
    print(f"{len(labels)} video(s) from {pipe.weights} weights written to {out}:")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
