"""FaceVidUNet3D vs FaceVidDiT at matched parameter count: parameters, FLOPs of a training step (forward +
backward, torch.utils.flop_counter), step time (forward + backward + AdamW) and activation memory, with and without
gradient checkpointing. No training run: what each backbone costs per step, not how good it gets (that comparison
needs a real training budget; README).

    python bench/unet_vs_dit.py                      # the demo backbones (configs/demo.yaml, configs/demo_dit.yaml)
    python bench/unet_vs_dit.py --batch 8 --device cuda

Activation memory: on CUDA the peak allocated during forward + backward minus the memory before it; on CPU the
bytes autograd saves for backward (bench/activations.py: each storage once, parameters left out), which misses what
checkpoint boundaries keep, so the CPU figure with checkpointing is a lower bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.activations import SavedForBackward  # noqa: E402
from facevid.config import load_config  # noqa: E402
from facevid.diffusion import build_noise_scheduler  # noqa: E402
from facevid.objective import Objective  # noqa: E402
from facevid.stages.text_to_video import BACKBONES  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build(config: str, text_width: int):
    cfg = load_config(CONFIGS / config, validate_files=False)
    torch.manual_seed(0)
    return BACKBONES[cfg.unet.backbone](cfg.unet, 4, 0, text_width), cfg


def measure(model, cfg, args, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    model = model.to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    objective = Objective.from_config(cfg.diffusion, build_noise_scheduler(cfg.diffusion))
    latents = torch.randn(args.batch, 4, args.frames, args.latent, args.latent, device=device)
    text = torch.randn(args.batch, args.text_tokens, args.text_width, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def loss():
        return objective.loss(lambda x, t: model(x, t, text), latents, generator)

    with FlopCounterMode(display=False) as counter:
        loss().backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss().backward()
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - before
    else:
        with SavedForBackward(model) as saved:
            value = loss()
        value.backward()
        activations = saved.bytes
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up allocator and kernels
        start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"flops": flops, "seconds": statistics.median(times[1:]), "activations": activations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", default="demo.yaml")
    parser.add_argument("--dit-config", default="demo_dit.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=8, help="latent height = width")
    parser.add_argument("--text-tokens", type=int, default=48)
    parser.add_argument("--text-width", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    print(f"batch {args.batch} x 4 x {args.frames} x {args.latent} x {args.latent} latents, {args.text_tokens} "
          f"text tokens of {args.text_width}, {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"{'backbone':<28}{'params':>9}{'GFLOP/step':>12}{'s/step':>9}{'act. MB':>10}"
          f"{'s/step ckpt':>13}{'act. MB ckpt':>14}")
    for config in (args.unet_config, args.dit_config):
        model, cfg = build(config, args.text_width)
        plain = measure(model, cfg, args, checkpointing=False)
        ckpt = measure(model, cfg, args, checkpointing=True)
        name = f"{type(model).__name__} ({config})"
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<28}{params:>8.2f}M{plain['flops'] / 1e9:>12.2f}{plain['seconds']:>9.3f}"
              f"{plain['activations'] / 2**20:>10.1f}{ckpt['seconds']:>13.3f}{ckpt['activations'] / 2**20:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
