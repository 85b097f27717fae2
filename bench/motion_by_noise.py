"""Does a trained text-to-video UNet tie each action to its words? Its predicted motion per noise level.

    .venv/bin/python bench/motion_by_noise.py --run runs/demo [--clips 12] [--threads 2]

For a FaceVid-Synth run: takes `--clips` training clips of each action from the run's latent cache, noises
them to several timesteps (the same noise for every caption), and prints, per action and timestep, the RMS
over the latents of the motion (each frame's deviation from the clip's mean frame) in the UNet's prediction of
the clean clip, with
- "own":    the clip's caption (regenerated from its attributes);
- "->X":    the same caption with only the action changed (to "still", or to "talking" for still clips);
- "null":   the empty caption (what classifier-free guidance pushes away from);
next to the clip's true motion and the share of it the "own" prediction recovers (100% = exact; it must fall
towards 0 at high noise, where the phase of a motion cannot be told from the input). The gap between "own"
and "->X" is how much motion the words cause: a model that draws nodding only when asked shows a wide gap.
Figures are in the units the UNet is trained in (motion-scaled, unit-variance latents).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import synth  # noqa: E402
from data.cache import LatentCache  # noqa: E402
from data.manifest import read_manifest  # noqa: E402
from demo.aids import frame_motion  # noqa: E402
from facevid.diffusion import build_noise_scheduler  # noqa: E402
from facevid.pipeline import FaceVidPipeline  # noqa: E402

TIMESTEPS = (100, 250, 400, 550, 700, 850, 999)


def motion_rms(latents: torch.Tensor) -> float:
    return float(frame_motion(latents).square().mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a FaceVid-Synth text-to-video run directory (cached data)")
    parser.add_argument("--clips", type=int, default=12, help="training clips per action")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = FaceVidPipeline.from_run(args.run)
    cfg = pipe.run_config
    if cfg.data.cache == "none":
        sys.exit(f"{args.run} trained without a latent cache; this benchmark reads the clips from one")
    cache = LatentCache(cfg.data.cache_dir)
    records, _ = read_manifest(cfg.data.manifest)
    by_action = defaultdict(list)
    for record in records:
        action = (record.attributes or {}).get("action")
        if action is None:
            sys.exit(f"{cfg.data.manifest} has no 'action' attribute: this benchmark needs FaceVid-Synth clips")
        if record.clip_id in cache.windows and len(by_action[action]) < args.clips:
            by_action[action].append(record)

    scheduler = build_noise_scheduler(cfg.diffusion)
    scale = pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(args.seed)
    objective = pipe.objective
    print(f"run {args.run}: {pipe.weights}, objective {objective.parameterization.to_dict()}, "
          f"{args.clips} clips per action")
    print(f"{'action':>14} {'caption':>9} " + " ".join(f"t={t:<5}" for t in TIMESTEPS))
    for action, clips in sorted(by_action.items()):
        clean = torch.stack([cache.latent(r.clip_id, *cache.windows[r.clip_id][0])[0].float() for r in clips])
        clean = objective.parameterization.to_model_space(clean * scale)
        swap = "talking" if action == "still" else "still"
        # Same template and synonyms for both captions (one rng seed per clip): only the action words differ.
        captions = {
            "own": [synth.caption_for(r.attributes, np.random.default_rng(i)) for i, r in enumerate(clips)],
            f"->{swap}": [synth.caption_for({**r.attributes, "action": swap}, np.random.default_rng(i))
                              for i, r in enumerate(clips)],
            "null": [""] * len(clips),
        }
        texts = {name: pipe.text_encoder(prompts) for name, prompts in captions.items()}
        rows = {name: [] for name in captions}
        recovered = []
        true_motion = frame_motion(clean)
        for t in TIMESTEPS:
            alpha = scheduler.alphas_cumprod[t]
            noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), torch.tensor([t]))
            for name, (text, mask) in texts.items():
                with torch.no_grad():
                    output = pipe.unet(noisy, torch.full((len(clips),), t), text, mask)
                output = objective.prediction(output, noisy, alpha)
                if cfg.diffusion.prediction_type == "v_prediction":
                    predicted = alpha.sqrt() * noisy - (1 - alpha).sqrt() * output
                else:  # epsilon
                    predicted = (noisy - (1 - alpha).sqrt() * output) / alpha.sqrt()
                rows[name].append(motion_rms(predicted))
                if name == "own":
                    error = frame_motion(predicted) - true_motion
                    recovered.append(100 * (1 - float(error.square().sum() / true_motion.square().sum())))
        print(f"{action:>14} {'true':>9} {motion_rms(clean):.3f}")
        for name, values in rows.items():
            print(f"{'':>14} {name:>9} " + " ".join(f"{v:<7.3f}" for v in values))
        if action != "still":  # a still clip has no motion to recover
            print(f"{'':>14} {'recov. %':>9} " + " ".join(f"{v:<7.0f}" for v in recovered))


if __name__ == "__main__":
    main()
