"""How big is the motion in a dataset's latents, next to the VAE's posterior noise? Guides the demo's motion_scale.

    .venv/bin/python bench/latent_motion.py --cache outputs/facevid_synth_cache \
        --manifest outputs/facevid_synth/manifest.jsonl --vae runs/demo-vae/vae [--group-by action]

Reads every clip's cached posterior (mean, std) and prints, in the diffusion model's unit-variance latent space
(x the VAE's scaling factor): the RMS deviation of the frames from the clip's mean frame ("motion"), and the
posterior's std (the noise vae.sample_posterior adds to every frame independently), per value of a manifest
attribute. Motion far below the posterior noise is motion the model can hardly see; motion_scale=s
multiplies it by s for training. The last line is the motion's std over all clips, the value the demo's motion_std
wants (times motion_scale).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.cache import LatentCache  # noqa: E402
from data.manifest import read_manifest  # noqa: E402
from demo.aids import frame_motion  # noqa: E402
from models.vae import load_vae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a latent cache folder (data.cache_dir)")
    parser.add_argument("--manifest", required=True, help="the manifest the cache was built from")
    parser.add_argument("--vae", required=True, help="the VAE the cache was built with (for its scaling factor)")
    parser.add_argument("--group-by", default="action", help="manifest attribute to group clips by")
    args = parser.parse_args()

    scale = load_vae(args.vae, None).config.scaling_factor
    cache = LatentCache(args.cache)
    records, _ = read_manifest(args.manifest)
    motion, noise = defaultdict(list), defaultdict(list)
    for record in records:
        for start, flip in cache.windows.get(record.clip_id, []):
            mean, std = cache.latent(record.clip_id, start, flip)  # (C, F, h, w), unscaled
            group = (record.attributes or {}).get(args.group_by, "(none)")
            motion[group].append(float(frame_motion(mean).square().mean().sqrt()) * scale)
            noise[group].append(float(std.square().mean().sqrt()) * scale)
    if not motion:
        sys.exit(f"no clip of {args.manifest} is in the cache {args.cache}")
    print(f"{args.group_by:>16} {'windows':>8} {'motion RMS':>11} {'posterior std':>14}  (unit-variance latents)")
    for group in sorted(motion):
        m, n = motion[group], noise[group]
        print(f"{group:>16} {len(m):>8} {sum(m) / len(m):>11.4f} {sum(n) / len(n):>14.4f}")
    every_m, every_n = sum(motion.values(), []), sum(noise.values(), [])
    print(f"{'all':>16} {len(every_m):>8} {sum(every_m) / len(every_m):>11.4f} {sum(every_n) / len(every_n):>14.4f}")
    # The std of every latent element's motion, over all clips: what the demo's motion_std wants (x motion_scale).
    print(f"motion std over all windows: {(sum(m * m for m in every_m) / len(every_m)) ** 0.5:.4f}")


if __name__ == "__main__":
    main()
