"""FaceVidUNet3D vs diffusers' UNet3DConditionModel on the same weights and inputs: forward+backward time and
activation memory, with and without FaceVid's gradient checkpointing (UNet3DConditionModel has none).

    .venv/bin/python bench/backbone_vs_diffusers.py [--sizes small medium] [--repeats 5] [--threads 1]
        [--diffusers-blocks] [--unet-at GIT_REVISION]

The FaceVid model is converted from the diffusers one (models/pretrained.py), so both compute the same function
(the max output difference is printed). Training mode, dropout 0 in both (diffusers hard-codes 0.1 in its
temporal convs; that is switched off so both do the same work).

Time: median of `repeats` forward + backward passes after one warm-up, the variants interleaved pass by pass so
load from other processes on a shared machine hits them alike; "CPU s" is the median process CPU time of the same
passes, which leaves out the time other processes hold the cores (with 1 thread, the steadier figure on a shared
machine). Activation memory, two ways that should agree:
- "held after forward": net bytes the forward pass allocated and has not freed when backward starts
  (torch.profiler with profile_memory), i.e. everything kept for backward, checkpointed blocks' inputs included;
- "saved for backward": bytes of the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks,
  parameters excluded, each storage once: bench/activations.py), the measure tests/test_unet.py uses.
Neither depends on the allocator, unlike RSS; the peak of a step is this plus the largest block's transients.

--diffusers-blocks adds FaceVidUNet3D rebuilt on diffusers' own blocks, same weights (docs/performance.md, "Why these
blocks"): every attention layer as diffusers' `Attention`, once with a processor that keeps FaceVid's features
(run-time backend, batches above 65,535 rows chunked: models.attention.attention) and once with diffusers' stock
AttnProcessor2_0 (neither feature); and every ResnetBlock as diffusers' `ResnetBlock2D`. It prints how many
state-dict keys each rebuild renames, which is what decides against them, whatever the speed.

--unet-at REV adds FaceVidUNet3D as models/unet3d.py was at git revision REV (same weights), to check that a change
of the UNet's code keeps outputs, speed and memory, side by side in one run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet3DConditionModel
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.activations import SavedForBackward  # noqa: E402
from bench.timing import interleaved_median_seconds  # noqa: E402
from models import attention as facevid_attention  # noqa: E402
from models.pretrained import from_unet3d  # noqa: E402
from models.unet3d import ResnetBlock  # noqa: E402

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


class BackendProcessor:
    """A diffusers attention processor with FaceVid's features: the run-time backend and the chunking of batches
    above 65,535 rows, both from models.attention.attention(); `attention_mask` is FaceVid's (B, Lk) bool mask."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=attn.heads)
                   for proj, x in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        out = facevid_attention.attention(q, k, v, key_padding_mask=attention_mask, backend=self.backend)
        return attn.to_out[1](attn.to_out[0](rearrange(out, "b h l d -> b l (h d)")))


def _replace(model, kind, rebuild):
    """A copy of `model` with every `kind` module replaced by rebuild(module) (same weights)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, rebuild(module))
    return model


def with_diffusers_attention(model, processor):
    def rebuild(ours):
        theirs = DiffusersAttention(ours.to_q.in_features, ours.to_k.in_features, heads=ours.heads,
                                    dim_head=ours.to_q.out_features // ours.heads, dropout=ours.dropout.p,
                                    processor=processor)
        theirs.to_q, theirs.to_k, theirs.to_v, theirs.to_out[0] = ours.to_q, ours.to_k, ours.to_v, ours.to_out
        return theirs

    return _replace(model, facevid_attention.Attention, rebuild)


def with_diffusers_resnets(model):
    def rebuild(ours):
        theirs = ResnetBlock2D(in_channels=ours.conv1.in_channels, out_channels=ours.conv1.out_channels,
                               temb_channels=ours.time_emb_proj.in_features, groups=ours.norm1.num_groups,
                               eps=ours.norm1.eps, dropout=ours.dropout.p)
        for name in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2"):
            setattr(theirs, name, getattr(ours, name))
        theirs.conv_shortcut = ours.shortcut if isinstance(ours.shortcut, torch.nn.Conv2d) else None
        return theirs.train(ours.training)

    return _replace(model, ResnetBlock, rebuild)


def unet_at_revision(revision: str, ours):
    """`ours` rebuilt from models/unet3d.py as it was at git `revision`, with the same weights."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:models/unet3d.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"unet3d_at_{revision}", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Path(handle.name).unlink()
    config = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    old = module.FaceVidUNet3D(**config)
    old.load_state_dict(ours.state_dict(), strict=True)  # fails loudly if the keys moved
    return old.train(ours.training)


def renamed_keys(ours, theirs) -> int:
    """State-dict keys of `ours` that `theirs` (the same weights) no longer has."""
    return len(set(ours.state_dict()) - set(theirs.state_dict()))


def step(model, inputs) -> torch.Tensor:
    out = model(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    out.pow(2).mean().backward()
    return out.detach()


def median_seconds(variants: list, inputs, repeats: int) -> tuple[list[float], list[float]]:
    """Per (model, checkpointing) variant, (wall, CPU) medians; one warm-up pass each, then the variants take
    turns. The process CPU time (1 thread) leaves out the time other processes hold the cores, which on a shared
    machine makes up most of the wall time."""
    cpu_times: list[list[float]] = [[] for _ in variants]

    def setup(i: int) -> None:
        model, checkpointing = variants[i]
        set_checkpointing(model, checkpointing)
        model.zero_grad(set_to_none=True)

    def run(i: int) -> None:
        start = time.process_time()
        step(variants[i][0], inputs)
        cpu_times[i].append(time.process_time() - start)

    wall = interleaved_median_seconds([partial(run, i) for i in range(len(variants))], repeats, warmup=1,
                                      setup=setup)
    return wall, [statistics.median(times[1:]) for times in cpu_times]  # [1:]: not the warm-up pass


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
    parser.add_argument("--diffusers-blocks", action="store_true",
                        help="add FaceVidUNet3D rebuilt on diffusers' Attention / ResnetBlock2D (see above)")
    parser.add_argument("--unet-at", metavar="GIT_REVISION",
                        help="add FaceVidUNet3D as models/unet3d.py was at this git revision (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} forward+backward passes\n")
    print("| size (B, C, F, H, W) | model | params | fwd+bwd s | vs diffusers | CPU s | vs diffusers "
          "| held after forward MiB | vs diffusers | saved for backward MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
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
        rebuilds = {}
        if args.diffusers_blocks:
            rebuilds = {
                "FaceVidUNet3D, diffusers Attention + FaceVid processor": with_diffusers_attention(
                    ours, BackendProcessor()),
                "FaceVidUNet3D, diffusers Attention + AttnProcessor2_0": with_diffusers_attention(
                    ours, AttnProcessor2_0()),
                "FaceVidUNet3D, diffusers ResnetBlock2D": with_diffusers_resnets(ours),
            }
        if args.unet_at:
            rebuilds[f"FaceVidUNet3D at {args.unet_at}"] = unet_at_revision(args.unet_at, ours)
        names += list(rebuilds)
        variants += [(model, False) for model in rebuilds.values()]
        times, cpu_times = median_seconds(variants, inputs, args.repeats)
        base_held = None
        for name, (model, checkpointing), took, cpu in zip(names, variants, times, cpu_times):
            set_checkpointing(model, checkpointing)
            held, saved = held_after_forward_bytes(model, inputs), saved_activation_bytes(model, inputs)
            base_held = base_held or held  # the diffusers row comes first
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"| {size} {tuple(shape)} | {name} | {params:.2f}M | {took:.3f} | {took / times[0]:.2f}x "
                  f"| {cpu:.3f} | {cpu / cpu_times[0]:.2f}x "
                  f"| {held / 2**20:.1f} | {held / base_held:.2f}x | {saved / 2**20:.1f} |")
        print(f"| {size} | max output difference FaceVid vs diffusers: {difference:.1e} | | | | | | | | |")
        for name, model in rebuilds.items():
            with torch.no_grad():
                rebuilt_difference = (model(*inputs) - ours(*inputs)).abs().max().item()
            print(f"| {size} | {name}: max output difference vs FaceVidUNet3D {rebuilt_difference:.1e}, "
                  f"state-dict keys renamed: {renamed_keys(ours, model)} of {len(ours.state_dict())} | | | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
