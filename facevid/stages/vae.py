"""Stage `vae`: trains a small AutoencoderKL on the dataset's frames (the embedded default ships no VAE
weights), then measures the latent scaling factor on the data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.video import tensor_to_frames
from facevid.ema import trainable_parameters
from facevid.pipeline import write_samples
from facevid.schema import RunConfig
from facevid.stages.common import fixed_validation_clips, training_fps
from models.vae import (
    build_tiny_vae,
    encode_video_posterior,
    load_vae,
)

logger = logging.getLogger("facevid")


class _VAEWithLoss(nn.Module):
    """Wraps the VAE so one forward returns reconstruction and KL (DDP syncs gradients through forward)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, frames: torch.Tensor, generator: torch.Generator):
        posterior = self.vae.encode(frames).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator=generator)).sample
        return reconstruction, posterior.kl().mean()


class VAEStage:
    name = "vae"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def build(self, accelerator, dataset) -> nn.Module:
        v = self.cfg.vae
        vae = load_vae(v.pretrained, v.subfolder) if v.pretrained else build_tiny_vae(
            v.block_out_channels, v.layers_per_block, v.latent_channels)
        self.device = accelerator.device
        self.dataset = dataset
        self.validation_clips = fixed_validation_clips(dataset, 4)
        return _VAEWithLoss(vae)

    def compute_loss(self, model, batch, generator):
        frames = batch["pixel_values"].to(self.device, non_blocking=True)  # async from pinned memory
        frames = frames.transpose(1, 2).flatten(0, 1)  # (B, 3, F, H, W) -> (B*F, 3, H, W)
        crop = self.cfg.vae.train_crop
        if crop is not None and crop < frames.shape[-1]:
            # Offsets stay on the device (index_select, not slicing): no host sync per micro-step.
            top, left = torch.randint(0, frames.shape[-1] - crop + 1, (2,), generator=generator,
                                      device=generator.device).to(frames.device)
            window = torch.arange(crop, device=frames.device)
            frames = frames.index_select(-2, top + window).index_select(-1, left + window)
        reconstruction, kl = model(frames, generator)
        mse = F.mse_loss(reconstruction.float(), frames.float())
        loss = mse + self.cfg.vae.kl_weight * kl
        # Tensors, not floats: reading them here would wait for the device every micro-step; the trainer
        # reads them only when it logs.
        extra, logs = self.extra_loss(reconstruction, frames)
        return (loss if extra is None else loss + extra), {"mse": mse.detach(), "kl": kl.detach(), **logs}

    def extra_loss(self, reconstruction: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """Extension point: a term added to MSE + KL, and what to log of it, as detached tensors (the demo's edge
        loss: demo/aids.py)."""
        return None, {}

    @torch.no_grad()
    def validate(self, model: _VAEWithLoss, out_dir: Path, step: int):
        clips = torch.stack([c["pixel_values"] for c in self.validation_clips]).to(self.device)
        mean, _ = encode_video_posterior(model.vae, clips, self.cfg.vae.chunk_frames)
        frames = mean.transpose(1, 2).flatten(0, 1)
        recon = model.vae.decode(frames).sample.clamp(-1, 1).unflatten(0, (clips.shape[0], -1)).transpose(1, 2)
        mse = F.mse_loss((recon + 1) / 2, (clips + 1) / 2).item()
        psnr = 10 * np.log10(1.0 / max(mse, 1e-10))
        # Original above, reconstruction below.
        pairs = np.stack([np.concatenate([tensor_to_frames(a.cpu()), tensor_to_frames(b.cpu())], axis=1)
                          for a, b in zip(clips, recon)])
        labels = [c["clip_id"] for c in self.validation_clips]
        paths = write_samples(pairs, labels, out_dir, fps=training_fps(self.cfg), formats=("mp4",))
        return {"reconstructions": paths}, {"val/psnr": float(psnr)}

    @torch.no_grad()
    def save_final(self, model: _VAEWithLoss, ema, run_dir: Path) -> None:
        vae = model.vae
        if ema is not None:  # the EMA weights are what is saved (the training weights are no longer needed)
            ema.copy_to(trainable_parameters(model))
        # Scale latents to unit variance for the diffusion model (what SD's 0.18215 does for its VAE).
        clips = torch.stack([self.dataset[i]["pixel_values"] for i in range(min(32, len(self.dataset)))])
        mean, _ = encode_video_posterior(vae, clips.to(self.device), self.cfg.vae.chunk_frames)
        scaling = float(1.0 / mean.std().clamp(min=1e-6))
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(run_dir / "vae")
        logger.info("VAE saved to %s (latent scaling factor %.4f)", run_dir / "vae", scaling)
