"""FaceVidUNet3D vs diffusers' UNet3DConditionModel on the same weights and inputs: forward+backward time and
activation memory, with and without FaceVid's gradient checkpointing (UNet3DConditionModel has none).

    .venv/bin/python bench/backbone_vs_diffusers.py [--sizes small medium] [--repeats 5] [--threads 1]

The FaceVid model is converted from the diffusers one (models/pretrained.py), so both compute the same function
(the max output difference is printed). Training mode, dropout 0 in both (diffusers hard-codes 0.1 in its
temporal convs; that is switched off so both do the same work).

Time: median of `repeats` forward + backward passes after one warm-up, the variants interleaved pass by pass so
load from other processes on a shared machine hits them alike. Activation memory, two ways that should agree:
- "held after forward": net bytes the forward pass allocated and has not freed when backward starts
  (torch.profiler with profile_memory), i.e. everything kept for backward, checkpointed blocks' inputs included;
- "saved for backward": bytes of the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks,
  parameters excluded, each storage once: bench/activations.py), the measure tests/test_unet.py uses.
Neither depends on the allocator, unlike RSS; the peak of a step is this plus the largest block's transients.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet3DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.activations import SavedForBackward  # noqa: E402
from bench.timing import interleaved_median_seconds  # noqa: E402
from models.pretrained import from_unet3d  # noqa: E402

SIZES = {
    # name: (UNet3DConditionModel config, latent input (B, C, F, H, W), text tokens)
    "small": (dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=16,
                   cross_attention_dim=64), (1, 4, 8, 16, 16), 16),
    "medium": (dict(block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=32,
                    cross_attention_dim=128), (2, 4, 8, 16, 16), 16),
}


def build(config: dict) -> UNet3DConditionModel:
    levels = len(config["block_out_channels"])
    down = ["CrossAttnDownBlock3D"] * (levels - 1) + ["DownBlock3D"]  # the ModelScope layout
    up = ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * (levels - 1)
    torch.manual_seed(0)
    model = UNet3DConditionModel(down_block_types=down, up_block_types=up, norm_num_groups=32, **config)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def step(model, inputs) -> torch.Tensor:
    out = model(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    out.pow(2).mean().backward()
    return out.detach()


def median_seconds(variants: list, inputs, repeats: int) -> list[float]:
    """Per (model, checkpointing) variant; one warm-up pass each, then the variants take turns."""

    def setup(i: int) -> None:
        model, checkpointing = variants[i]
        set_checkpointing(model, checkpointing)
        model.zero_grad(set_to_none=True)

    return interleaved_median_seconds([partial(step, model, inputs) for model, _ in variants], repeats,
                                      warmup=1, setup=setup)


def set_checkpointing(model, enabled: bool) -> None:
    if enabled:
        model.enable_gradient_checkpointing()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()


def held_after_forward_bytes(model, inputs) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        output = model(*inputs)  # kept alive (with its graph) until the profile ends
    del output
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


def saved_activation_bytes(model, inputs) -> int:
    model.zero_grad(set_to_none=True)
    with SavedForBackward(model) as saved:
        step(model, inputs)
    return saved.bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} forward+backward passes\n")
    print("| size (B, C, F, H, W) | model | params | fwd+bwd s | vs diffusers | held after forward MiB "
          "| vs diffusers | saved for backward MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        config, shape, tokens = SIZES[size]
        generator = torch.Generator().manual_seed(0)
        inputs = (torch.randn(shape, generator=generator), torch.tensor([500] * shape[0]),
                  torch.randn(shape[0], tokens, config["cross_attention_dim"], generator=generator))
        reference = build(config)
        ours = from_unet3d(reference).train()
        with torch.no_grad():
            difference = (reference(*inputs).sample - ours(*inputs)).abs().max().item()
        names = ["diffusers UNet3DConditionModel", "FaceVidUNet3D", "FaceVidUNet3D + checkpointing"]
        variants = [(reference, False), (ours, False), (ours, True)]
        times = median_seconds(variants, inputs, args.repeats)
        base_held = None
        for name, (model, checkpointing), took in zip(names, variants, times):
            set_checkpointing(model, checkpointing)
            held, saved = held_after_forward_bytes(model, inputs), saved_activation_bytes(model, inputs)
            base_held = base_held or held  # the diffusers row comes first
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"| {size} {tuple(shape)} | {name} | {params:.2f}M | {took:.3f} | {took / times[0]:.2f}x "
                  f"| {held / 2**20:.1f} | {held / base_held:.2f}x | {saved / 2**20:.1f} |")
        print(f"| {size} | max output difference FaceVid vs diffusers: {difference:.1e} | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
