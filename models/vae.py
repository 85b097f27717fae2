"""The video VAE: a diffusers AutoencoderKL applied frame by frame, in chunks so memory stays bounded."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from einops import rearrange


def load_vae(pretrained: str, subfolder: str | None = None) -> AutoencoderKL:
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return AutoencoderKL.from_pretrained(pretrained, **kwargs)


def build_tiny_vae(block_out_channels: list[int], layers_per_block: int, latent_channels: int) -> AutoencoderKL:
    """A small AutoencoderKL trained from scratch by stage `vae` (the embedded default has no VAE weights)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        # No attention in the mid block: the VAE stays purely convolutional, so training on small
        # crops carries over to whole frames, and a step is cheaper.
        mid_block_add_attention=False,
        scaling_factor=1.0,  # measured on the data at the end of the VAE stage
    )


def downscale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _chunked(frames: torch.Tensor, chunk: int, fn) -> torch.Tensor:
    return torch.cat([fn(frames[i : i + chunk]) for i in range(0, frames.shape[0], chunk)])


@torch.no_grad()
def encode_video_posterior(vae: AutoencoderKL, video: torch.Tensor, chunk_frames: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, F, H, W) in [-1, 1] -> posterior (mean, std), each (B, C, F, h, w), unscaled."""
    batch = video.shape[0]
    frames = rearrange(video, "b c f h w -> (b f) c h w").to(vae.dtype)
    moments = _chunked(frames, chunk_frames, lambda x: vae.encode(x).latent_dist.parameters)
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    mean, std = (rearrange(x, "(b f) c h w -> b c f h w", b=batch) for x in (mean, std))
    return mean, std


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator=None) -> torch.Tensor:
    """Draw z ~ N(mean, std) and scale it to the unit-variance space the diffusion model works in."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, chunk_frames: int = 16) -> torch.Tensor:
    """Scaled latents (B, C, F, h, w) -> video (B, 3, F, H, W) in [-1, 1]."""
    batch = latents.shape[0]
    frames = rearrange(latents / vae.config.scaling_factor, "b c f h w -> (b f) c h w").to(vae.dtype)
    pixels = _chunked(frames, chunk_frames, lambda z: vae.decode(z).sample)
    return rearrange(pixels.float().clamp(-1, 1), "(b f) c h w -> b c f h w", b=batch)
