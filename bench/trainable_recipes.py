"""What each training recipe trains (train.trainable, facevid/trainable.py) and what it costs:

    .venv/bin/python bench/trainable_recipes.py [--config configs/t2v_256.yaml] [--threads 2] [--repeats 5]
                                                [--width-divisor 5] [--counts-only]

1. At full width (the config's UNet; Stable Diffusion 1.5 inflated, configs/animatediff_256.yaml; ModelScope's
   UNet3DConditionModel, configs/lora_modelscope_256.yaml): trainable parameters and AdamW memory per recipe. The
   models are built on PyTorch's meta device (shapes only): the counts come from the real modules, adapters
   included, at no memory cost. AdamW keeps 2 fp32 states per trainable
   parameter, and mixed-precision training an fp32 master copy: 12 bytes per trainable parameter; gradients add 4.
2. On this machine at reduced width (the config's UNet with every width divided by --width-divisor): one training
   step (forward + backward + fused AdamW over the trainable parameters only, as facevid/trainer.py builds it), the
   recipes interleaved step by step (bench/timing.py), the same initial weights and inputs. Denormal floats are
   flushed to zero (--keep-denormals to not): the zero-initialised output layers of fresh temporal blocks fill a CPU
   step with denormals that made it 2-4x slower here, a CPU artefact GPUs do not have.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_median_seconds  # noqa: E402
from facevid.config import load_config  # noqa: E402
from facevid.ema import trainable_parameters  # noqa: E402
from facevid.stages.text_to_video import build_unet  # noqa: E402
from facevid.trainable import select_trainable  # noqa: E402
from models.pretrained import facevid_config_from_unet2d, facevid_config_from_unet3d  # noqa: E402
from models.unet3d import FaceVidUNet3D  # noqa: E402

RECIPES = {
    "full": [],
    "temporal only": ["train.trainable=temporal"],
    "LoRA r=16": ["train.trainable=lora", "lora.rank=16", "lora.alpha=16"],
    "LoRA r=64": ["train.trainable=lora", "lora.rank=64", "lora.alpha=64"],
}
TEXT_WIDTH = 768  # CLIP ViT-L/14, the text encoder of configs/t2v_256.yaml and of Stable Diffusion 1.5
GIB = 2**30


def recipe_config(path: str, overrides: list[str]):
    # Only the recipe's settings are read: its manifest and weights need not exist here.
    return load_config(path, overrides, validate_files=False)


def sd15_inflated() -> FaceVidUNet3D:
    """Stable Diffusion 1.5's UNet (UNet2DConditionModel's defaults with 768-wide text) inflated to video."""
    from diffusers import UNet2DConditionModel

    return FaceVidUNet3D(**facevid_config_from_unet2d(dict(UNet2DConditionModel(cross_attention_dim=768).config)))


def modelscope() -> FaceVidUNet3D:
    """ModelScope text-to-video's UNet3DConditionModel (its published config) as FaceVidUNet3D."""
    from diffusers import UNet3DConditionModel

    config = UNet3DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                                  attention_head_dim=64, layers_per_block=2, sample_size=32).config
    return FaceVidUNet3D(**facevid_config_from_unet3d(dict(config)))


def count_table(config: str) -> list[str]:
    rows = []
    models = [(Path(config).stem, lambda cfg: build_unet(cfg.unet, 4, 0, TEXT_WIDTH), RECIPES),
              ("SD 1.5 inflated (animatediff_256)", lambda cfg: sd15_inflated(),
               {k: v for k, v in RECIPES.items() if k != "full"}),
              ("ModelScope t2v (lora_modelscope_256)", lambda cfg: modelscope(),
               {k: v for k, v in RECIPES.items() if k.startswith("LoRA")})]
    for model_name, build, recipes in models:
        for recipe, overrides in recipes.items():
            cfg = recipe_config(config, overrides)
            with torch.device("meta"):
                model = build(cfg)
                select_trainable(model, cfg)
            trainable = sum(p.numel() for p in trainable_parameters(model))
            total = sum(p.numel() for p in model.parameters())
            rows.append(f"| {model_name} | {recipe} | {trainable / 1e6:,.1f}M | {100 * trainable / total:.2f}% | "
                        f"{total / 1e6:,.0f}M | {12 * trainable / GIB:.2f} | {16 * trainable / GIB:.2f} |")
    return rows


def step_times(config: str, divisor: int, repeats: int, batch: int, frames: int, side: int) -> list[str]:
    base_cfg = recipe_config(config, [])
    u = base_cfg.unet
    widths = [c // divisor for c in u.block_out_channels]
    reduced = replace(u, block_out_channels=widths, gradient_checkpointing=False)
    torch.manual_seed(0)
    reference = build_unet(reduced, 4, 0, TEXT_WIDTH)
    runs, rows = [], []
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, frames, side, side, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, 77, TEXT_WIDTH, generator=generator)
    counts = {}
    for recipe, overrides in RECIPES.items():
        cfg = recipe_config(config, overrides)
        model = copy.deepcopy(reference)
        torch.manual_seed(0)  # LoRA's A matrices: the same draw for every rank
        select_trainable(model, cfg)
        params = trainable_parameters(model)
        counts[recipe] = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def train_step(model=model, optimizer=optimizer) -> None:
            model(sample, timestep, text).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        runs.append(train_step)
    medians = interleaved_median_seconds(runs, repeats, warmup=1)
    full = medians[0]
    total = sum(p.numel() for p in reference.parameters())
    print(f"reduced width {widths} ({total / 1e6:.1f}M parameters), batch {batch} x {frames} frames of {side}x{side} "
          f"latents, 77 text tokens; {torch.get_num_threads()} thread(s), median of {repeats} steps")
    for (recipe, _), median in zip(RECIPES.items(), medians):
        rows.append(f"| {recipe} | {counts[recipe] / 1e6:.2f}M | {median:.3f} | {full / median:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/t2v_256.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width-divisor", type=int, default=5, help="5: [320, 640, 1280, 1280] -> [64, 128, 256, 256]")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent-size", type=int, default=8)
    parser.add_argument("--counts-only", action="store_true", help="part 1 only")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats to zero")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)

    print("## Full width: trainable parameters and AdamW memory (12 B = 2 fp32 states + fp32 master per trainable "
          "parameter; 16 B with fp32 gradients)\n")
    print("| UNet | recipe | trainable | of all | all parameters (adapters incl.) | AdamW states + master (GiB) | + gradients (GiB) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(count_table(args.config)))
    if args.counts_only:
        return
    print("\n## Step time on this machine (forward + backward + AdamW; denormals "
          f"{'kept' if args.keep_denormals else 'flushed to zero'})\n")
    rows = step_times(args.config, args.width_divisor, args.repeats, args.batch, args.frames, args.latent_size)
    print("\n| recipe | trainable | s / step | speed vs full |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
