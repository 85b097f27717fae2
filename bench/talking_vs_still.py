"""Does "talking" show in a run's samples? Prompt pairs that differ only in the action word, measured at the mouth.

    .venv/bin/python bench/talking_vs_still.py --run runs/demo [--pairs 32] [--sheet talking.png]

Draws N FaceVid-Synth attribute sets, writes each as two captions from the same template and synonyms, one
"talking" and one "keeping still", and samples both with the same seed (the run's sampling settings). For the
generated videos and for the real clips of the same attributes (FaceVid-Synth rendered as the run's data is,
with its motion timing and frame window), it measures the mouth: the mean darkness of the mouth's box per frame,
relative to the clip's mean (an open mouth is dark), and prints
- that darkness frame by frame, averaged over the prompts (with aligned motion, real talking mouths open and
  close in one rhythm, so the average keeps it; the generated average shows whether the model learnt it);
- its swing: the RMS over frames, per video, averaged (grey levels; any change, flicker included);
- how much of it is the talking rhythm: each curve projected on the real talking clip's curve with the same
  attributes, averaged (1 = the real mouth's opening and closing, 0 = none of it);
- how many videos follow that rhythm (correlation > 0.5).
--sheet writes the first pairs' faces, enlarged, talking above still.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import synth  # noqa: E402
from data.video import center_crop_resize, save_contact_sheet  # noqa: E402
from facevid.pipeline import FaceVidPipeline  # noqa: E402

# The mouth's box and the face's, as fractions of the frame: FaceVid-Synth puts the face's centre at 0.42 of the
# height (+-0.03) with a half-height of 0.245, so the mouth (synth.MOUTH_Y half-heights below) sits near 0.53.
MOUTH_BOX = (0.47, 0.69, 0.375, 0.625)  # top, bottom, left, right
FACE_BOX = (0.19, 0.88, 0.16, 0.84)


def box(video: np.ndarray, fractions) -> np.ndarray:
    size = video.shape[-2]
    top, bottom, left, right = (round(f * size) for f in fractions)
    return video[..., top:bottom, left:right, :]


def mouth_darkness(videos: np.ndarray) -> np.ndarray:
    """(N, T) darkness of the mouth's box per frame, minus each clip's mean (grey levels)."""
    dark = -box(videos.astype(np.float64), MOUTH_BOX).mean(axis=(2, 3, 4))
    return dark - dark.mean(axis=1, keepdims=True)


def in_rhythm(curves: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per video: its curve's projection on the reference curve (least-squares gain; 1 = the reference)."""
    return (curves * reference).sum(axis=1) / np.maximum((reference**2).sum(axis=1), 1e-12)


def follows(curves: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per video: does its curve correlate with the reference's (> 0.5)? A flat curve follows nothing."""
    result = []
    for c, r in zip(curves, reference):
        result.append(c.std() > 0 and r.std() > 0 and np.corrcoef(c, r)[0, 1] > 0.5)
    return np.array(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a text-to-video run directory")
    parser.add_argument("--pairs", type=int, default=32, help="prompt pairs (talking / keeping still)")
    parser.add_argument("--seed", type=int, default=0, help="draws the attributes; pair i is sampled with seed + i")
    parser.add_argument("--sheet", help="PNG: the first --show pairs' faces, talking above still")
    parser.add_argument("--show", type=int, default=4)
    args = parser.parse_args()

    pipe = FaceVidPipeline.from_run(args.run)
    cfg = pipe.run_config
    data = cfg.data
    # How the run's FaceVid-Synth clips were drawn (data/synth.py records it next to the manifest).
    info_file = Path(data.manifest).parent / "synth_info.json"
    if not info_file.is_file():
        sys.exit(f"{data.manifest} is not a FaceVid-Synth folder ({info_file.name} missing)")
    drawn = json.loads(info_file.read_text())
    rng = np.random.default_rng(args.seed)
    people = [(synth.sample_attributes(rng), int(rng.integers(2**31))) for _ in range(args.pairs)]
    captions = {action: [synth.caption_for(dict(a, action=action), np.random.default_rng(s)) for a, s in people]
                for action in ("talking", "still")}
    window = slice(0, data.num_frames * data.frame_stride, data.frame_stride)  # the cache's window (start 0)
    real, generated = {}, {}
    for action, prompts in captions.items():
        real[action] = np.stack([center_crop_resize(synth.render_clip(
            dict(a, action=action), drawn["num_frames"], drawn["resolution"], s,
            drawn["aligned_motion"])[window], data.resolution) for a, s in people])
        generated[action] = pipe(prompts, seed=[args.seed + i for i in range(len(prompts))],
                                 num_frames=data.num_frames, resolution=data.resolution,
                                 num_inference_steps=cfg.sample.num_inference_steps,
                                 guidance_scale=cfg.sample.guidance_scale, scheduler=cfg.sample.scheduler)
    rhythm = mouth_darkness(real["talking"])  # each person's real talking mouth

    print(f"{args.run}: {args.pairs} prompt pairs, mouth darkness relative to the clip's mean (grey levels)")
    print(f"{'':>17} {'frame by frame, mean over prompts':<47} {'swing':>6} {'in rhythm':>9} {'follows it':>10}")
    for source, videos in (("real", real), ("generated", generated)):
        for action in ("talking", "still"):
            curves = mouth_darkness(videos[action])
            swing = np.sqrt((curves**2).mean(axis=1)).mean()
            per_frame = " ".join(f"{v:5.1f}" for v in curves.mean(axis=0))
            print(f"{source + ' ' + action:>17} {per_frame:<47} {swing:6.2f} {in_rhythm(curves, rhythm).mean():9.2f} "
                  f"{follows(curves, rhythm).sum():>7}/{args.pairs}")
    if args.sheet:
        videos, labels = [], []
        for i in range(min(args.show, args.pairs)):
            for action in ("talking", "still"):
                videos.append(box(generated[action][i], FACE_BOX))
                labels.append(captions[action][i])
        save_contact_sheet(args.sheet, videos, labels, min_side=96)
        print(f"faces written to {args.sheet}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
