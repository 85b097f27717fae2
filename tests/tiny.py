"""Tiny but real runs for tests: FaceVid-Synth clips, a VAE trained for a few steps, a small UNet.

Everything goes through the production code (train.py's Trainer, the real text encoder); only the
sizes are small (16x16 pixels, 4 frames), so a run takes seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from facevid.config import load_config

# 16 px frames, VAE factor 2 -> 8x8 latents; UNet with one down level -> 4x4 at the bottom.
TINY = [
    "data.resolution=16", "data.num_frames=4", "data.frame_stride=1", "data.num_workers=0",
    "data.cache=none",
    "vae.block_out_channels=[32,32]", "vae.chunk_frames=8",
    "unet.block_out_channels=[32,32]", "unet.attention_levels=[false,true]", "unet.attention_head_dim=16",
    "train.batch_size=2", "train.learning_rate=1e-3", "train.lr_warmup_steps=2", "train.log_every=1",
    "train.checkpoint_every=1000", "train.tracker=none", "train.ema_decay=0.9",
    "sample.num_inference_steps=4", "sample.guidance_scale=2.0",
    "train.validation_prompts=[a person with red hair talking]",
]


def tiny_config(manifest: Path, output_dir: Path, *overrides: str, stage: str = "t2v", vae: Path | None = None):
    base = [f"stage={stage}", f"output_dir={output_dir}", f"data.manifest={manifest}"] + TINY
    if stage == "t2v":
        base.append(f"vae.pretrained={vae}")
    return load_config(None, base + list(overrides))


def train_tiny_vae(manifest: Path, run: Path, steps: int = 2) -> Path:
    """Run the production VAE stage for a few steps; returns the saved vae/ folder."""
    from facevid.stages import STAGES
    from facevid.trainer import Trainer

    cfg = tiny_config(manifest, run, f"train.max_steps={steps}", "train.ema_decay=null", stage="vae")
    Trainer(cfg, STAGES["vae"](cfg)).fit()
    return run / "vae"
