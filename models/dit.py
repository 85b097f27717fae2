"""FaceVidDiT: a latent video diffusion transformer, the alternative backbone to FaceVidUNet3D (unet.backbone: dit).

Implements the denoiser contract FaceVidUNet3D keeps (models/denoiser.py: VideoDenoiser), with the same attention
backends (models/attention.py) and diffusers save/load, so the trainer, cache, objective, samplers, tasks and export
use it unchanged.

    latents (+ condition channels) --patchify (Conv3d, kernel = stride = temporal_patch x patch x patch)-->
    tokens (B, F' * H' * W', D) + 3D sin-cos positions --> depth x DiTBlock --> adaLN, Linear --> unpatchify

DiTBlock (one class: the FSDP wrap unit and the gradient-checkpointing unit, `_no_split_modules`):

    x = x + gate1 * SelfAttention(modulate(LayerNorm(x), shift1, scale1))   over its `mode`'s tokens
    x = x + CrossAttention(LayerNorm(x), text)                              every token to the text tokens
    x = x + gate2 * MLP(modulate(LayerNorm(x), shift2, scale2))

Design choices:
- Self-attention `attention: alternating` (Latte's variant 1): even blocks attend within each frame (H'W'
  tokens), odd blocks across the frames at each patch location (F' tokens). Cost grows as F'(H'W')^2 + H'W'F'^2
  instead of (F'H'W')^2, and a spatial block is exactly an image DiT's, so image pretraining transfers.
  `attention: full` attends over all F'H'W' tokens in every block (CogVideoX / Open-Sora 2 style): better motion
  coupling, quadratic in the clip's token count. The UNet's factorised design is the alternating one.
- Text through cross-attention after self-attention (PixArt-alpha / Latte). The text states keep their own
  width (no projection into the video stream), which suits the frozen MiniLM / CLIP / T5 encoders FaceVid uses,
  and its cost is linear in the number of video tokens. Joint attention (MM-DiT: text tokens concatenated into
  the self-attention sequence with their own weights) would replace `cross_attn` inside DiTBlock and keep the
  block's signature (it already receives the text and its mask).
- Timestep conditioning by adaLN-Zero in PixArt-alpha's "adaLN-single" form: one shared Linear maps the timestep
  embedding to the 6 modulation vectors, each block adds its own learned (6, D) table. Per-block adaLN Linears
  (DiT) are 6 D^2 parameters a block, ~27% of a DiT-XL; PixArt-alpha showed the shared form loses nothing.
  The shared Linear and every table start at zero, so every gate is 0 and every block starts as the identity;
  the cross-attention output and the final projection are zero too: the untrained model predicts exactly 0.
- Positions: fixed, factorised sin-cos over (frame, row, column), computed for whatever grid comes in: any frame
  count and any aspect ratio without a learned table to interpolate (data.buckets train several sizes), and
  nothing position-dependent in the checkpoint. 3D RoPE extrapolates better to longer clips than trained, but
  needs its own attention path (rotating q and k), which the shared attention() kernels do not take.
- `unet.pooled_text_conditioning` works here too: an MLP of the mean text state is added to the timestep
  embedding (zero-initialised), which small models learn global attributes from far sooner.

Frames: a clip whose frame count is not a multiple of temporal_patch_size is padded at the end with copies of
its last frame and the padded outputs are dropped. Height and width must be multiples of patch_size
(`spatial_factor`, what the trainer and config validation check resolution against).
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from models.attention import Attention, usable_attention_backend
from models.denoiser import VideoDenoiser
from models.unet3d import _masked_mean, feed_forward

ATTENTION_LAYOUTS = ("alternating", "full")
TIMESTEP_CHANNELS = 256  # sinusoidal timestep features before the MLP (DiT's frequency_embedding_size)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] features, frequencies 1 .. 1/10000 (Transformer's)."""
    frequency = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=positions.device) / (dim // 2))
    angles = positions.float()[:, None] * frequency[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(frames: int, rows: int, cols: int, dim: int, device=None) -> torch.Tensor:
    """(frames * rows * cols, dim) positions of a token grid in (frame, row, column) order: each axis gets an
    even third of the channels (any remainder stays 0)."""
    axis_dim = dim // 6 * 2
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in (frames, rows, cols)),
                                      indexing="ij"), dim=-1).reshape(-1, 3)
    table = torch.cat([sincos_1d(grid[:, axis], axis_dim) for axis in range(3)], dim=1)
    return nn.functional.pad(table, (0, dim - 3 * axis_dim))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention over `mode`'s tokens ("spatial": within a frame, "temporal": across frames, "full": all),
    cross-attention to the text, MLP; adaLN-Zero modulated (see the module docstring)."""

    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: int, mode: str, dropout: float,
                 backend: str):
        super().__init__()
        self.mode = mode
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, head_dim, dropout=dropout, backend=backend)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads, head_dim, context_dim=context_dim, dropout=dropout, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = feed_forward(dim, dropout, "gelu", mlp_ratio)
        # This block's adaLN-single table, added to the shared timestep modulation (PixArt-alpha).
        self.modulation = nn.Parameter(torch.zeros(6, dim))
        nn.init.zeros_(self.cross_attn.to_out.weight)
        nn.init.zeros_(self.cross_attn.to_out.bias)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """x (B, F'*N, D) in (frame, row, column) order; modulation (B, 6, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (modulation + self.modulation).unbind(dim=1)
        h = _modulate(self.norm1(x), shift1, scale1)
        if self.mode == "spatial":
            h = rearrange(self.attn(rearrange(h, "b (f n) d -> (b f) n d", f=num_frames)),
                          "(b f) n d -> b (f n) d", f=num_frames)
        elif self.mode == "temporal":
            h = rearrange(self.attn(rearrange(h, "b (f n) d -> (b n) f d", f=num_frames)),
                          "(b n) f d -> b (f n) d", b=x.shape[0])
        else:
            h = self.attn(h)
        x = x + gate1[:, None] * h
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FaceVidDiT(VideoDenoiser, ModelMixin, ConfigMixin):
    """Latent video diffusion transformer: (B, C, F, H, W) noisy latents + timestep + text -> (B, C_out, F, H, W).

    Args:
        in_channels / out_channels: latent channels.
        condition_channels: extra input channels concatenated to the noisy latent (image-to-video's first-frame
            latent, facevid/tasks.py); 0 disables the `condition` input.
        cross_attention_dim: width of the text states (B, L, D).
        patch_size: spatial patch side (the latent's H and W must be multiples of it).
        temporal_patch_size: frames per patch (1 = every latent frame its own tokens; 2 halves the tokens).
        hidden_size: token width D (a multiple of num_heads).
        depth: number of DiTBlocks.
        num_heads: attention heads (head width = hidden_size / num_heads).
        mlp_ratio: MLP hidden width / hidden_size.
        attention: "alternating" (spatial, temporal, spatial, ...; Latte) or "full" (3D attention every block).
        pooled_text_conditioning: add an MLP of the mean text state to the timestep embedding.
        dropout: dropout in attention outputs and MLPs.
        attention_backend: "auto", "sdpa", "math" or "xformers" (models.attention); run-time, not saved.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]  # Accelerate's FSDP2 wraps these when the config names no class
    _repeated_blocks = ["DiTBlock"]  # diffusers' convention: what train.compile=blocks compiles (facevid/compile.py)
    ignore_for_config = ["attention_backend"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        condition_channels: int = 0,
        cross_attention_dim: int = 384,
        patch_size: int = 2,
        temporal_patch_size: int = 1,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: int = 4,
        attention: str = "alternating",
        pooled_text_conditioning: bool = False,
        dropout: float = 0.0,
        attention_backend: str = "auto",
    ):
        super().__init__()
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {attention!r}.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}.")
        for name, value in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size),
                            ("depth", depth), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        backend = usable_attention_backend(attention_backend)
        self.patch_embed = nn.Conv3d(in_channels + condition_channels, hidden_size,
                                     kernel_size=(temporal_patch_size, patch_size, patch_size),
                                     stride=(temporal_patch_size, patch_size, patch_size))
        self.time_proj = Timesteps(TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(TIMESTEP_CHANNELS, hidden_size)
        self.text_pool_embedding = None
        if pooled_text_conditioning:
            self.text_pool_embedding = nn.Sequential(nn.Linear(cross_attention_dim, hidden_size), nn.SiLU(),
                                                     nn.Linear(hidden_size, hidden_size))
            _zero(self.text_pool_embedding[-1])
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))  # shared (adaLN-single)
        _zero(self.adaln[-1])
        modes = ["full"] * depth if attention == "full" else [("spatial", "temporal")[i % 2] for i in range(depth)]
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, cross_attention_dim, mlp_ratio, mode, dropout, backend) for mode in modes
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        _zero(self.out_modulation[-1])
        self.proj_out = nn.Linear(hidden_size, temporal_patch_size * patch_size ** 2 * out_channels)
        _zero(self.proj_out)
        self.gradient_checkpointing = False

    @property
    def spatial_factor(self) -> int:
        """The latent's height and width must be multiples of this (the UNet's is 2 ** (levels - 1))."""
        return self.config.patch_size

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None, condition=None):
        """The denoiser contract (models/denoiser.py: VideoDenoiser.forward); H and W multiples of patch_size."""
        self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask, condition)
        config = self.config
        batch_size, _, num_frames, height, width = sample.shape
        if condition is not None:
            sample = torch.cat([sample, condition], dim=1)
        pad = -num_frames % config.temporal_patch_size
        if pad:  # repeat the last frame; its outputs are dropped below
            sample = torch.cat([sample, sample[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        x = self.patch_embed(sample)
        grid = x.shape[2:]
        x = rearrange(x, "b d f h w -> b (f h w) d")
        x = x + sincos_3d(*grid, x.shape[-1], device=x.device).to(x.dtype)

        temb = self._embed_timestep(timestep, batch_size, x.dtype, x.device)
        if self.text_pool_embedding is not None:
            temb = temb + self.text_pool_embedding(_masked_mean(encoder_hidden_states, encoder_attention_mask))
        modulation = self.adaln(temb).view(batch_size, 6, -1)
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        for block in self.blocks:
            args = (x, modulation, encoder_hidden_states, mask, grid[0])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, *args)
            else:
                x = block(*args)

        shift, scale = self.out_modulation(temb).chunk(2, dim=1)
        x = self.proj_out(_modulate(self.norm_out(x), shift, scale))
        p, tp = config.patch_size, config.temporal_patch_size
        x = rearrange(x, "b (f h w) (t p q c) -> b c (f t) (h p) (w q)", f=grid[0], h=grid[1], w=grid[2],
                      t=tp, p=p, q=p)
        return x[:, :, :num_frames]


def _zero(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
