"""FaceVidUNet3D: a text-conditioned latent video diffusion UNet.

Video tensors are (B, C, F, H, W). Internally frames are folded into the batch, (B*F, C, H, W), so every
image layer (ResNet convs, spatial self-attention, text cross-attention) runs per frame, exactly as in an
image UNet. Frames only exchange information through the temporal transformers, which attend over the F
frames at each spatial location.

One "UNetLayer" (repeated `layers_per_block` times per level on the way down, one more on the way up):

    ResnetBlock          per-frame convs, timestep embedding injected
    SpatialTransformer   self-attn over the H*W tokens of a frame, cross-attn to the text, feed-forward
                         (levels where attention_levels is True)
    TemporalTransformer  self-attn over the F frames at each pixel with sinusoidal frame positions, optional
                         feed-forward (every level by default, see temporal_attention_levels)

The mid block is a layer with both transformers followed by a plain ResnetBlock layer.

Temporal attention sits at every level by default, also the highest-resolution ones where fine motion (lips,
eyes) lives; it is cheap there because each sequence is only F tokens long. Its output projections start at
zero, so an untrained model treats frames independently and image-pretrained weights are not disturbed.

A few options (all off by default) mirror diffusers' UNet3DConditionModel (ModelScope / zeroscope) layer for
layer, so its weights load here and ours export to it (models/pretrained.py): `ff_activation="geglu"`,
`temporal_conv` (a TemporalConvLayer after every ResnetBlock), `temporal_block="transformer"` (its
TransformerTemporalModel), `input_temporal_transformer` (its `transformer_in`), `norm_eps`, and
`cross_attention_mask=False` (those models attend to every text token, padding included). The run config's
`unet.layout: modelscope` sets them all (models.pretrained.layout_options).
`temporal_block="animatediff"` mirrors an AnimateDiff motion module in the same slot (models/animatediff.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import GEGLU
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import TemporalConvLayer
from diffusers.models.upsampling import Upsample2D
from einops import rearrange
from torch import nn

from models.attention import Attention, usable_attention_backend
from models.denoiser import VideoDenoiser

TEMPORAL_POSITION_ENCODINGS = ("sinusoidal", "none")
FF_ACTIVATIONS = ("gelu", "geglu")
TEMPORAL_BLOCKS = ("attention", "transformer", "animatediff")
TEMPORAL_NORMS = ("video", "frame")
ANIMATEDIFF_HEADS = 8  # every AnimateDiff motion module: 8 heads of C/8 channels


def interleaved_sinusoids(num_frames: int, dim: int, device=None) -> torch.Tensor:
    """(num_frames, dim) frame positions as AnimateDiff's PositionalEncoding stores them: sin in the even
    channels, cos in the odd ones (FaceVid's own "sinusoidal" puts all cos first, then all sin)."""
    position = torch.arange(num_frames, device=device).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_frames, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def feed_forward(dim: int, dropout: float, activation: str = "gelu", mult: int = 4) -> nn.Sequential:
    """The last module is always the output Linear (callers zero-initialise it). "geglu" is diffusers' GEGLU
    (value * gelu(gate), Stable Diffusion's feed-forward input), whose `proj` keeps the key names."""
    if activation == "geglu":
        return nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))
    return nn.Sequential(
        nn.Linear(dim, dim * mult),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(dim * mult, dim),
    )


class ResnetBlock(nn.Module):
    """Per-frame residual conv block; the timestep embedding is added between the two convs."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, groups: int, dropout: float, eps: float
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class SpatialTransformer(nn.Module):
    """Per-frame spatial self-attention, cross-attention to the text, feed-forward."""

    def __init__(
        self,
        channels: int,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        dropout: float,
        backend: str,
        ff_activation: str = "gelu",
    ):
        super().__init__()
        head_dim = channels // heads
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_self = nn.LayerNorm(channels)
        self.self_attn = Attention(channels, heads, head_dim, dropout=dropout, backend=backend)
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attn = Attention(
            channels, heads, head_dim, context_dim=cross_attention_dim, dropout=dropout, backend=backend
        )
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = feed_forward(channels, dropout, ff_activation)
        self.proj_out = nn.Linear(channels, channels)

    def forward(
        self,
        x: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        num_frames: int,
    ) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "bf c h w -> bf (h w) c")
        tokens = self.proj_in(tokens)
        tokens = tokens + self.self_attn(self.norm_self(tokens))
        # Cross-attention treats every token independently, so all frames of a video can share one query
        # sequence; this avoids repeating the text context F times.
        video_tokens = rearrange(tokens, "(b f) s c -> b (f s) c", f=num_frames)
        video_tokens = video_tokens + self.cross_attn(
            self.norm_cross(video_tokens), encoder_hidden_states, encoder_attention_mask
        )
        tokens = rearrange(video_tokens, "b (f s) c -> (b f) s c", f=num_frames)
        tokens = tokens + self.ff(self.norm_ff(tokens))
        tokens = self.proj_out(tokens)
        return x + rearrange(tokens, "bf (h w) c -> bf c h w", h=height, w=width)


class TemporalTransformer(nn.Module):
    """Self-attention over the frames at each spatial location; the block is the identity at initialisation.

    block="attention" (FaceVid's own): LayerNorm -> attention [-> LayerNorm -> feed-forward], each branch
        residual, every branch's output projection zero-initialised.
    block="transformer" (UNet3DConditionModel's TransformerTemporalModel): GroupNorm over the whole video ->
        proj_in to heads * head_dim channels -> two self-attentions and a feed-forward (each LayerNorm'ed and
        residual) -> proj_out (zero-initialised) -> added to the input.
    block="animatediff" (an AnimateDiff motion module): the "transformer" block with AnimateDiff's frame
        positions (interleaved_sinusoids) added to the input of BOTH self-attentions.
    norm (transformer / animatediff blocks): "video" = GroupNorm statistics over all frames of a video
        (TransformerTemporalModel, diffusers' AnimateDiffTransformer3D); "frame" = each frame normalised on its
        own (the original AnimateDiff code, which its published motion modules were trained with).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        position_encoding: str,
        use_feed_forward: bool,
        dropout: float,
        backend: str,
        block: str = "attention",
        ff_activation: str = "gelu",
        groups: int = 32,
        norm: str = "video",
    ):
        super().__init__()
        self.position_encoding = position_encoding
        self.block = block
        self.norm_per_frame = norm == "frame"
        width = heads * head_dim
        if block != "attention":
            self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
            self.proj_in = nn.Linear(channels, width)
        self.norm_attn = nn.LayerNorm(width)
        self.attn = Attention(width, heads, head_dim, dropout=dropout, backend=backend)
        if block != "attention":
            self.norm_attn2 = nn.LayerNorm(width)
            self.attn2 = Attention(width, heads, head_dim, dropout=dropout, backend=backend)
            self.proj_out = nn.Linear(width, channels)
            zero_init = [self.proj_out]
        else:
            zero_init = [self.attn.to_out]
        self.ff = None
        if use_feed_forward or block != "attention":
            self.norm_ff = nn.LayerNorm(width)
            self.ff = feed_forward(width, dropout, ff_activation)
            if block == "attention":
                zero_init.append(self.ff[-1])
        for out_proj in zero_init:
            nn.init.zeros_(out_proj.weight)
            nn.init.zeros_(out_proj.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.block != "attention" and self.norm_per_frame:
            tokens = self.proj_in(rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=num_frames))
        elif self.block != "attention":
            # GroupNorm statistics span all frames of a video, as in TransformerTemporalModel.
            video = self.norm(rearrange(x, "(b f) c h w -> b c f h w", f=num_frames))
            tokens = self.proj_in(rearrange(video, "b c f h w -> (b h w) f c"))
        else:
            tokens = rearrange(x, "(b f) c h w -> (b h w) f c", f=num_frames)
        # Computed on the fly, so any number of frames works (nothing is stored in the state dict).
        positions = None
        if self.position_encoding == "sinusoidal" and self.block == "animatediff":
            positions = interleaved_sinusoids(num_frames, tokens.shape[-1], x.device).to(tokens.dtype)
        elif self.position_encoding == "sinusoidal":
            positions = get_timestep_embedding(
                torch.arange(num_frames, device=x.device), tokens.shape[-1], flip_sin_to_cos=True,
                downscale_freq_shift=0,
            ).to(tokens.dtype)
        attn_input = self.norm_attn(tokens)
        tokens = tokens + self.attn(attn_input if positions is None else attn_input + positions)
        if self.block != "attention":
            attn_input = self.norm_attn2(tokens)
            if self.block == "animatediff" and positions is not None:
                attn_input = attn_input + positions
            tokens = tokens + self.attn2(attn_input)
        if self.ff is not None:
            tokens = tokens + self.ff(self.norm_ff(tokens))
        if self.block != "attention":
            return x + rearrange(self.proj_out(tokens), "(b h w) f c -> (b f) c h w", h=height, w=width)
        return rearrange(tokens, "(b h w) f c -> (b f) c h w", h=height, w=width)


class UNetLayer(nn.Module):
    """[ResnetBlock] -> [TemporalConvLayer] -> [SpatialTransformer] -> [TemporalTransformer]; any may be absent.

    With gradient checkpointing on (ModelMixin.enable_gradient_checkpointing sets `gradient_checkpointing` and
    `_gradient_checkpointing_func` on this module), each sub-block keeps only its inputs for backward and
    recomputes its activations.
    """

    def __init__(
        self,
        resnet: ResnetBlock | None,
        spatial: SpatialTransformer | None = None,
        temporal: TemporalTransformer | None = None,
        temporal_conv: TemporalConvLayer | None = None,
    ):
        super().__init__()
        self.resnet = resnet
        self.temporal_conv = temporal_conv
        self.spatial = spatial
        self.temporal = temporal
        self.gradient_checkpointing = False

    def _maybe_checkpoint(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self, x, temb, encoder_hidden_states, encoder_attention_mask, num_frames: int, temporal: bool = True
    ) -> torch.Tensor:
        if self.resnet is not None:
            x = self._maybe_checkpoint(self.resnet, x, temb)
        if self.temporal_conv is not None and temporal:
            x = self._maybe_checkpoint(self.temporal_conv, x, num_frames)
        if self.spatial is not None:
            x = self._maybe_checkpoint(
                self.spatial, x, encoder_hidden_states, encoder_attention_mask, num_frames
            )
        if self.temporal is not None and temporal:
            x = self._maybe_checkpoint(self.temporal, x, num_frames)
        return x


def _masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) token states -> (B, D): the mean over real tokens (all tokens when mask is None)."""
    if mask is None:
        return states.mean(dim=1)
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class FaceVidUNet3D(VideoDenoiser, ModelMixin, ConfigMixin):
    """Latent video diffusion UNet: (B, C, F, H, W) noisy latents + timestep + text -> (B, C_out, F, H, W).

    Args:
        in_channels / out_channels: latent channels.
        condition_channels: extra channels concatenated to the noisy latent (e.g. a reference-frame latent for
            image-to-video); 0 disables the `condition` input.
        block_out_channels: channels per resolution level; the latent is downsampled 2x between levels, so H
            and W must be divisible by 2 ** (len(block_out_channels) - 1).
        layers_per_block: UNet layers per level on the down path (the up path has one more, as in diffusers).
        attention_levels: per level, whether it gets spatial self-attention + text cross-attention.
            The mid block always has them.
        temporal_attention_levels: per level, whether it gets temporal attention; None = every level.
            The mid block always has it.
        attention_head_dim: channels per head (heads = channels // attention_head_dim, at least 1); one value,
            or one per level (the mid block uses the last).
        cross_attention_dim: width D of the text states (B, L, D).
        norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
        temporal_position_encoding: "sinusoidal" (works for any frame count) or "none".
        temporal_feed_forward: add a feed-forward after each temporal attention (block "attention"; the
            "transformer" block always has one). Off by default: it costs ~25% of a CPU training step at demo
            size for little gain there; worth turning on for larger runs.
        attention_backend: "auto", "sdpa", "math" or "xformers" (see models.attention). A run-time choice, not
            saved in the config (a model trained with xformers must load on a CPU machine); "xformers" where it
            cannot run falls back to "auto" with a warning.
        dropout: dropout in resnets, attention outputs and feed-forwards.
        norm_eps: epsilon of the ResnetBlock and output GroupNorms.
        ff_activation: "gelu" (Linear, GELU, Linear) or "geglu" (Stable Diffusion's gated GELU) feed-forwards.
        temporal_conv: a TemporalConvLayer (UNet3DConditionModel's, from diffusers) after every ResnetBlock.
        temporal_block: "attention" (FaceVid's), "transformer" (UNet3DConditionModel's) or "animatediff" (an
            AnimateDiff motion module: always 8 heads, GEGLU feed-forward with ff_activation="geglu"), see
            TemporalTransformer.
        temporal_norm: "video" or "frame": how the transformer / animatediff blocks' GroupNorm pools its
            statistics, see TemporalTransformer.
        input_temporal_transformer: a "transformer" temporal block right after conv_in (UNet3DConditionModel's
            `transformer_in`: 8 heads of attention_head_dim[0] channels).
        cross_attention_mask: use `encoder_attention_mask` in text cross-attention. False = attend to every
            token, padding included, as pretrained UNet3D/UNet2DConditionModels were trained (their pipelines
            never pass a mask); the mask argument is then ignored.
        pooled_text_conditioning: also add an MLP of the mean of the (unmasked) text token states to the
            timestep embedding, as Imagen does. Every ResNet block then sees the whole prompt at once, which
            a small model learns far sooner than attribute-by-attribute cross-attention (the demo's colours
            follow their prompts only with it). Its output layer starts at zero, so enabling it on a
            pretrained UNet leaves that UNet's function unchanged.
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["UNetLayer"]  # diffusers' convention: what train.compile=blocks compiles (facevid/compile.py)
    # Not saved, and dropped from configs saved before it was ignored: the kernel is chosen where the model runs.
    ignore_for_config = ["attention_backend"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        condition_channels: int = 0,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 1,
        attention_levels: tuple[bool, ...] = (False, True, True),
        temporal_attention_levels: tuple[bool, ...] | None = None,
        attention_head_dim: int | tuple[int, ...] = 32,
        cross_attention_dim: int = 384,
        norm_num_groups: int = 32,
        temporal_position_encoding: str = "sinusoidal",
        temporal_feed_forward: bool = False,
        attention_backend: str = "auto",
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        ff_activation: str = "gelu",
        temporal_conv: bool = False,
        temporal_block: str = "attention",
        temporal_norm: str = "video",
        input_temporal_transformer: bool = False,
        cross_attention_mask: bool = True,
        pooled_text_conditioning: bool = False,
    ):
        super().__init__()
        num_levels = len(block_out_channels)
        if temporal_attention_levels is None:
            temporal_attention_levels = (True,) * num_levels
        head_dims = (attention_head_dim,) * num_levels if isinstance(attention_head_dim, int) else attention_head_dim
        for name, levels in (
            ("attention_levels", attention_levels),
            ("temporal_attention_levels", temporal_attention_levels),
            ("attention_head_dim", head_dims),
        ):
            if len(levels) != num_levels:
                raise ValueError(
                    f"{name} has {len(levels)} entries but block_out_channels has {num_levels}; "
                    "give one per level."
                )
        for channels in block_out_channels:
            if channels % norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry, "
                    f"got {channels}."
                )
        for name, value, valid in (
            ("temporal_position_encoding", temporal_position_encoding, TEMPORAL_POSITION_ENCODINGS),
            ("ff_activation", ff_activation, FF_ACTIVATIONS),
            ("temporal_block", temporal_block, TEMPORAL_BLOCKS),
            ("temporal_norm", temporal_norm, TEMPORAL_NORMS),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}.")
        if temporal_norm == "frame" and temporal_block == "attention":
            raise ValueError('temporal_norm="frame" needs a temporal_block with a GroupNorm ("transformer" or '
                             '"animatediff"); the "attention" block has none.')
        attention_backend = usable_attention_backend(attention_backend)

        def num_heads(channels: int, head_dim: int) -> int:
            heads = max(1, channels // head_dim)
            if channels % heads:
                raise ValueError(
                    f"{channels} channels cannot be split evenly into heads of attention_head_dim={head_dim}."
                )
            return heads

        def temporal_transformer(channels: int, heads: int, head_dim: int, block: str) -> TemporalTransformer:
            return TemporalTransformer(
                channels, heads, head_dim, temporal_position_encoding, temporal_feed_forward, dropout,
                attention_backend, block=block, ff_activation=ff_activation, groups=norm_num_groups,
                norm=temporal_norm,
            )

        def make_layer(in_ch: int, out_ch: int, level: int, spatial: bool, temporal: bool) -> UNetLayer:
            heads = num_heads(out_ch, head_dims[level])
            resnet = ResnetBlock(in_ch, out_ch, temb_channels, norm_num_groups, dropout, norm_eps)
            spatial_block = temporal_block_ = temporal_conv_block = None
            if temporal_conv:
                temporal_conv_block = TemporalConvLayer(out_ch, dropout=dropout, norm_num_groups=norm_num_groups)
            if spatial:
                spatial_block = SpatialTransformer(
                    out_ch, heads, cross_attention_dim, norm_num_groups, dropout, attention_backend, ff_activation
                )
            if temporal:
                temporal_heads = ANIMATEDIFF_HEADS if temporal_block == "animatediff" else heads
                if out_ch % temporal_heads:
                    raise ValueError(f"{out_ch} channels cannot be split into {temporal_heads} temporal heads.")
                temporal_block_ = temporal_transformer(out_ch, temporal_heads, out_ch // temporal_heads,
                                                       temporal_block)
            return UNetLayer(resnet, spatial_block, temporal_block_, temporal_conv_block)

        base_channels = block_out_channels[0]
        temb_channels = base_channels * 4
        self.time_proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base_channels, temb_channels)
        self.text_pool_embedding = None
        if pooled_text_conditioning:
            self.text_pool_embedding = TimestepEmbedding(cross_attention_dim, temb_channels)
            nn.init.zeros_(self.text_pool_embedding.linear_2.weight)
            nn.init.zeros_(self.text_pool_embedding.linear_2.bias)
        self.conv_in = nn.Conv2d(in_channels + condition_channels, base_channels, kernel_size=3, padding=1)
        self.input_layer = None
        if input_temporal_transformer:
            self.input_layer = UNetLayer(
                None, temporal=temporal_transformer(base_channels, 8, head_dims[0], "transformer")
            )

        # Down path. `skip_channels` mirrors the skip tensors forward() pushes, so the up path knows their
        # widths.
        skip_channels = [base_channels]
        self.down_layers = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        channels = base_channels
        for level, level_channels in enumerate(block_out_channels):
            layers = nn.ModuleList()
            for _ in range(layers_per_block):
                layers.append(
                    make_layer(
                        channels, level_channels, level, attention_levels[level], temporal_attention_levels[level]
                    )
                )
                channels = level_channels
                skip_channels.append(channels)
            self.down_layers.append(layers)
            if level < num_levels - 1:
                self.downsamplers.append(nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))
                skip_channels.append(channels)

        last = num_levels - 1
        self.mid_layers = nn.ModuleList(
            [
                make_layer(channels, channels, last, spatial=True, temporal=True),
                make_layer(channels, channels, last, spatial=False, temporal=False),
            ]
        )

        # Up path: one more layer per level than the down path, so every skip tensor is consumed.
        self.up_layers = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(num_levels)):
            layers = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                layers.append(
                    make_layer(
                        channels + skip_channels.pop(),
                        block_out_channels[level],
                        level,
                        attention_levels[level],
                        temporal_attention_levels[level],
                    )
                )
                channels = block_out_channels[level]
            self.up_layers.append(layers)
            if level > 0:
                # Nearest 2x then a 3x3 conv (no checkerboard artefacts, unlike transposed convs).
                self.upsamplers.append(Upsample2D(channels, use_conv=True))

        self.norm_out = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    @property
    def spatial_factor(self) -> int:
        """The latent's height and width must be multiples of this: 2 ** (levels - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def embed_conditions(self, timestep, encoder_hidden_states, encoder_attention_mask, sample):
        """(B, temb) embedding every ResnetBlock gets (timestep [+ pooled text]), and the (B, D) pooled text.
        `sample` is the UNet's input (after the condition channels), for its batch size, dtype and device."""
        temb = self._embed_timestep(timestep, sample.shape[0], sample.dtype, sample.device)
        pooled_text = _masked_mean(encoder_hidden_states, encoder_attention_mask)
        if self.text_pool_embedding is not None:
            temb = temb + self.text_pool_embedding(pooled_text)
        return temb, pooled_text

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        temporal: bool = True,
    ) -> torch.Tensor:
        """The denoiser contract (models/denoiser.py: VideoDenoiser.forward), and:

        Args:
            encoder_attention_mask: ignored when the model was built with cross_attention_mask=False.
            temporal: False runs the spatial layers only (joint image + video training: an image batch, F = 1,
                trains them alone). The temporal blocks, temporal convs and the text motion head are skipped,
                so their parameters get no gradient: at F = 1 they are not the identity (attention over one
                frame still applies its value and output projections, a temporal conv its centre tap).
        """
        self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask, condition)
        num_frames = sample.shape[2]
        if condition is not None:
            sample = torch.cat([sample, condition], dim=1)
        temb, _ = self.embed_conditions(timestep, encoder_hidden_states, encoder_attention_mask, sample)
        if not self.config.cross_attention_mask:
            encoder_attention_mask = None
        if encoder_attention_mask is not None:
            encoder_attention_mask = encoder_attention_mask.bool()
        temb = temb.repeat_interleave(num_frames, dim=0)  # one row per frame, matching the "(b f)" layout
        layer_args = (encoder_hidden_states, encoder_attention_mask, num_frames, temporal)

        x = self.conv_in(rearrange(sample, "b c f h w -> (b f) c h w"))
        if self.input_layer is not None:
            x = self.input_layer(x, temb, *layer_args)
        skips = [x]
        for level, layers in enumerate(self.down_layers):
            for layer in layers:
                x = layer(x, temb, *layer_args)
                skips.append(x)
            if level < len(self.downsamplers):
                x = self.downsamplers[level](x)
                skips.append(x)

        for layer in self.mid_layers:
            x = layer(x, temb, *layer_args)

        for level, layers in enumerate(self.up_layers):
            for layer in layers:
                x = layer(torch.cat([x, skips.pop()], dim=1), temb, *layer_args)
            if level < len(self.upsamplers):
                x = self.upsamplers[level](x)

        return rearrange(self.conv_out(F.silu(self.norm_out(x))), "(b f) c h w -> b c f h w", f=num_frames)
