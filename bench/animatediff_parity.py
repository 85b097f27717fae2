"""FaceVidUNet3D built from a Stable Diffusion 1.5-layout UNet + an AnimateDiff motion module vs diffusers'
UNetMotionModel.from_unet2d on the same random weights and inputs (fp32, CPU): the largest output difference.

    .venv/bin/python bench/animatediff_parity.py [--width 0.2] [--frames 16] [--size 32] [--threads 1]

The layout is SD 1.5's (4 levels, 2 layers per block, CrossAttn x3 + plain block, 8 spatial heads, text width 768,
motion modules in every layer and the mid block, 8 temporal heads); --width scales the channels [320, 640, 1280,
1280] (1.0 = the real 1.3B parameters: about 21 GB of fp32 weights for the four copies this script holds).
Every weight is perturbed so the zero-initialised output projections take part. FaceVid runs with
motion_module_norm="video", the GroupNorm diffusers uses (tests/test_animatediff.py checks "frame" too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.animatediff import from_unet2d_and_motion, motion_module_from_state  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.2, help="fraction of SD 1.5's channels (multiple of 32)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent height and width (32 = 256 px)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    channels = tuple(max(32, round(c * args.width / 32) * 32) for c in (320, 640, 1280, 1280))

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=channels, cross_attention_dim=768, attention_head_dim=8)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in list(unet.parameters()) + list(adapter.parameters()):
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    reference = UNetMotionModel.from_unet2d(unet, adapter).eval()
    model = from_unet2d_and_motion(unet, motion_module_from_state(adapter.state_dict(), "adapter"),
                                   temporal_norm="video").eval()

    sample = torch.randn(1, 4, args.frames, args.size, args.size, generator=generator)
    timestep, text = torch.tensor([500]), torch.randn(1, 77, 768, generator=generator)
    with torch.no_grad():
        expected = reference(sample, timestep, text.repeat_interleave(args.frames, dim=0)).sample
        got = model(sample, timestep, text)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"torch {torch.__version__}, {args.threads} thread(s); channels {list(channels)}, {params:.1f}M params, "
          f"latents {tuple(sample.shape)}")
    print(f"max |FaceVid - diffusers| = {(got - expected).abs().max().item():.3g} "
          f"(output max |x| = {expected.abs().max().item():.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
