"""Evaluate a trained text-to-video run: FVD, FID, CLIP score, FaceVid-Synth attribute alignment.

    python evaluate.py --run runs/demo                          # alignment on 64 held-out FaceVid-Synth prompts
    python evaluate.py --run runs/demo --metrics fvd,fid,clip,alignment --i3d weights/i3d_torchscript.pt \\
        --inception weights/inception-2015-12-05.pt --clip openai/clip-vit-base-patch32
    python evaluate.py --run runs/demo --prompts configs/demo_prompts.txt --metrics clip,alignment
    python evaluate.py --run runs/demo --dataset data/val.jsonl --limit 256 --metrics fvd,alignment

Generates one video per prompt (seed + i for prompt i), writes RUN/eval/<set>/metrics.json,
metrics.md (the results table) and samples.png (generated above real), and RUN/plots/training_curves.png.
"""

import argparse
import sys

from data.video import VideoDecodeError
from evaluation.features import MissingWeightsError
from evaluation.runner import METRICS, check_metrics
from facevid.schema import EvaluationConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by train.py (stage t2v)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synth-heldout", type=int, metavar="N",
                        help="N held-out FaceVid-Synth prompts, half with unseen attribute combinations (default 64)")
    source.add_argument("--prompts", help="text file, one prompt per line (attributes parsed from FaceVid-Synth captions)")
    source.add_argument("--dataset", help="manifest: its clips' first captions as prompts, the clips as real videos")
    parser.add_argument("--limit", type=int, help="with --dataset: the first N clips")
    defaults = EvaluationConfig()  # the same defaults as a training config's eval: section
    parser.add_argument("--metrics", default=",".join(defaults.metrics),
                        help=f"comma-separated, from {','.join(METRICS)} (default: %(default)s)")
    parser.add_argument("--i3d", default=defaults.i3d, help="FVD: I3D TorchScript file (i3d_torchscript.pt)")
    parser.add_argument("--inception", default=defaults.inception,
                        help="FID: Inception TorchScript file (inception-2015-12-05.pt)")
    parser.add_argument("--clip", default=defaults.clip, help="CLIP score: CLIPModel hub id or local folder")
    parser.add_argument("--reference", help="manifest of real clips for FVD / FID with --prompts "
                                            "(default: the run's training manifest)")
    parser.add_argument("--train-manifest", help="manifest whose attribute combinations count as seen "
                                                 "(default: the run's data.manifest)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the run's sample.num_inference_steps)")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--scheduler", choices=["dpm++", "ddim"])
    parser.add_argument("--frames", type=int, help="default: the training clip length")
    parser.add_argument("--resolution", type=int, help="default: the training resolution")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="prompt i is sampled with seed + i")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--save-videos", action="store_true", help="also write every generated video as mp4")
    parser.add_argument("--out", help="output folder (default: RUN/eval/<eval set>)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)

    try:
        metrics = list(check_metrics(m.strip() for m in args.metrics.split(",") if m.strip()))
    except ValueError as err:
        parser.error(str(err))
    config = EvaluationConfig(
        metrics=metrics, i3d=args.i3d, inception=args.inception, clip=args.clip, num_frames=args.frames,
        resolution=args.resolution, steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
        seed=args.seed, batch_size=args.batch_size, synth_heldout=args.synth_heldout or defaults.synth_heldout,
        reference_manifest=args.reference, train_manifest=args.train_manifest, save_videos=args.save_videos)
    from evaluation.cli import run_cli  # heavy imports only after the arguments are known to be valid

    try:
        return run_cli(args, config, args.device or _default_device())
    except (MissingWeightsError, FileNotFoundError, ValueError, VideoDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
