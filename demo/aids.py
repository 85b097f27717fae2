"""The CPU demo's aids: what makes a 32 px, 420-step run on 2 cores show faces that follow their prompts.

None of this is part of the framework. Each aid was tuned on FaceVid-Synth at the demo's budget
(docs/demo.md, docs/experiments.md) and plugs into the core through its extension points only:

- MotionPreconditionedV (a facevid.objective Parameterization): v-prediction on latents whose motion (each
  frame's deviation from the clip's mean frame) is scaled by `motion_scale`, with that motion preconditioned for
  data of std `motion_std`, so an unsure model predicts still frames rather than flickering ones.
- MotionWeighting (a facevid.objective LossWeighting): extra loss weight where the clip moves, so a talking
  mouth counts as much as a nodding head.
- DemoUNet3D (a FaceVidUNet3D subclass): pooled text -> a coarse clean-latent layout (+ a per-frame part) added
  to the output, which a small model learns in a few hundred steps.
- DemoVAEStage / DemoTextToVideoStage: the core stages with the above plugged in (build_objective, new_unet),
  and the VAE's edge loss (extra_loss).

A config turns them on with

    plugin:
      module: demo
      options: {...}      # DemoConfig's fields
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config

# diffusers loads an exported pipeline's DemoUNet3D by looking up its base class ModelMixin in this module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from facevid.objective import LossWeighting, Objective, Parameterization
from facevid.schema import ConfigError, RunConfig
from facevid.stages import TextToVideoStage, VAEStage
from models.unet3d import FaceVidUNet3D


@dataclass
class DemoConfig:
    """plugin.options of the demo's configs (configs/demo*.yaml)."""

    # The model denoises clips whose motion is multiplied by this; samples are scaled back before decoding.
    # 1 = plain latents.
    motion_scale: float = 1.0
    # The std of the motion in the latents the model denoises (after motion_scale; bench/latent_motion.py prints
    # it): the UNet's output for the motion is preconditioned for data of this std. null = plain v-prediction.
    motion_std: Optional[float] = None
    # Extra loss weight where the clip moves: each latent location's error x (1 + this x its motion relative to
    # the clip's largest, or to motion_floor when that is smaller). 0 = plain MSE.
    motion_loss_weight: float = 0.0
    # Motion below which a clip is not stretched to full weight. 0.1 suits the demo's latents: at motion_scale 4
    # a still clip's VAE jitter peaks at ~0.03, a talking mouth at ~0.9, a nodding head at ~3.7.
    motion_floor: float = 0.1
    # Pooled text -> coarse clean-latent prior added to the UNet's output (DemoUNet3D). Needs low guidance.
    text_layout: bool = False
    text_layout_size: int = 16
    # > 0: the layout also gets a per-frame part, this many frames; learns an action's timing only where every
    # clip of it moves in step (FaceVid-Synth generated with --aligned-motion).
    text_motion_frames: int = 0
    # Stage vae: weight of an MSE on the reconstruction error's horizontal and vertical pixel differences, which
    # pulls edges (eyes, mouth, hairline) in sooner than plain MSE. 0 = none.
    vae_edge_loss_weight: float = 0.0


def options(cfg: RunConfig) -> DemoConfig:
    """cfg.plugin.options as a DemoConfig; unknown keys and wrong types are ConfigErrors naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DemoConfig), dict(cfg.plugin.options))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = f"plugin.options.{getattr(err, 'full_key', '?')}"
        reason = str(err.msg).splitlines()[0]  # OmegaConf appends the key and type on further lines
        raise ConfigError(f"config key '{key}': {reason} (valid keys: {', '.join(DemoConfig.__dataclass_fields__)})") \
            from None


def validate(cfg: RunConfig) -> None:
    """Called by facevid.config.load_config for a config with plugin.module: demo."""
    o = options(cfg)

    def fail(key: str, value, expected: str):
        raise ConfigError(f"config key 'plugin.options.{key}' = {value!r} is invalid: {expected}")

    if not o.motion_scale > 0:
        fail("motion_scale", o.motion_scale, "must be > 0 (1 = plain latents)")
    if o.motion_scale != 1.0 and cfg.task == "i2v":
        fail("motion_scale", o.motion_scale, "must be 1 for task i2v: its sampler writes the given first frame "
             "into the latents, which motion scaling would change")
    if o.motion_std is not None:
        if not o.motion_std > 0:
            fail("motion_std", o.motion_std, "must be > 0 (e.g. 0.1, what bench/latent_motion.py prints for the "
                 "data), or null for plain v-prediction")
        if cfg.diffusion.prediction_type != "v_prediction":
            fail("motion_std", o.motion_std, "needs diffusion.prediction_type=v_prediction (it preconditions the "
                 "v-prediction parameterisation)")
    for key in ("motion_loss_weight", "motion_floor", "vae_edge_loss_weight", "text_motion_frames"):
        if getattr(o, key) < 0:
            fail(key, getattr(o, key), "must be >= 0")
    if o.motion_loss_weight > 0 and cfg.diffusion.min_snr_gamma is not None:
        fail("motion_loss_weight", o.motion_loss_weight, "needs diffusion.min_snr_gamma=null (the demo's motion "
             "weighting is uniform over timesteps)")
    if o.text_layout_size < 1:
        fail("text_layout_size", o.text_layout_size, "must be an integer >= 1")
    if o.text_motion_frames and not o.text_layout:
        fail("text_motion_frames", o.text_motion_frames, "is a part of the text layout: set text_layout=true, or 0")
    if o.text_layout and cfg.unet.pretrained:
        fail("text_layout", True, "adds layers to a UNet built from scratch; unet.pretrained must be null")


# ----------------------------------------------------------------------------------------------- motion
def mean_frame(latents: torch.Tensor) -> torch.Tensor:
    """The clip's mean frame (frame axis dim -3), kept as a length-1 frame axis."""
    return latents.mean(dim=-3, keepdim=True)


def frame_motion(latents: torch.Tensor) -> torch.Tensor:
    """The motion: each frame's deviation from the clip's mean frame (frame axis dim -3)."""
    return latents - mean_frame(latents)


def scale_motion(latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply each frame's deviation from the clip's mean frame by `scale` (frame axis dim -3).

    Talking-head motion is tiny next to appearance (FaceVid-Synth, demo VAE, bench/latent_motion.py: a talking
    mouth moves the latents by ~0.025 std, blinking ~0.006), so in plain latents it drowns in the noise, and
    every error a model makes differently per frame shows as flicker. Training on scale_motion(z, s) and
    decoding scale_motion(sample, 1 / s) raises the motion's signal-to-noise ratio by s^2 and divides per-frame
    errors by s, while the mean frame (appearance) sees exactly the plain schedule. scale = 1 returns the
    latents unchanged.
    """
    if scale == 1.0:
        return latents
    mean = mean_frame(latents)
    return mean + scale * (latents - mean)


def motion_weights(latents: torch.Tensor, weight: float, floor: float = 0.1) -> torch.Tensor:
    """Per-location loss weights (B, 1, 1, h, w) for clean latents (B, C, F, h, w): 1 + weight x how far the
    location's frames deviate from their mean (RMS over channels and frames), relative to the clip's most
    moving location (or to `floor` when that is smaller).

    Why: the loss is an average over every latent element, and a talking mouth is one or two locations of
    an 8x8 latent moving by a seventh of what a nodding head does (bench/latent_motion.py), so its share of
    the loss, and of the gradient that ties the word "talking" to it, is ~1%. Normalising by the clip's own
    peak gives every moving clip's moving part the same extra weight, however small the motion.
    """
    amount = frame_motion(latents).float().square().mean(dim=(1, 2), keepdim=True).sqrt()
    peak = amount.amax(dim=(-2, -1), keepdim=True).clamp(min=floor)
    return 1.0 + weight * amount / peak


def motion_preconditioned_velocity(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                                   motion_std: float) -> torch.Tensor:
    """The v-prediction that a UNet output means when its motion part is preconditioned for motion of std
    `motion_std`. Latents (B, C, F, h, w) or (C, F, h, w); alpha_bar: one per video.

    Plain v-prediction predicts the clean latents as a x_t - s v (x_t = a x0 + s noise, a^2 + s^2 = 1), the
    preconditioning of Karras et al. (EDM, 2022) for data of unit std. That fits the mean frame, but the
    frames' deviation from it (the motion) has std ~0.1 in the demo's latents: there, the skip term a x_t
    copies each frame's own noise into the predicted clean clip, and the network has to learn to cancel it
    exactly, or the frames flicker. Here the mean frame keeps that parameterisation and the motion uses EDM's
    c_skip and c_out for sigma = s / a and data std m: predicted motion = c_skip dev(x_t) / a - c_out
    dev(output), so at high noise the skip is ~(m / sigma)^2 and an unsure network predicts still frames; the
    network's output there has unit std. The result is returned as the equivalent velocity
    (a dev(x_t) - predicted motion) / s, so the loss (the same v-MSE, i.e. the same weighting of clean-latent
    errors) and diffusers' samplers are unchanged. motion_std = 1 is plain v-prediction.
    """
    shape = (-1,) + (1,) * (output.ndim - 1)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=output.device).reshape(shape)
    a, s, m = alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), motion_std
    # The formula above with c_skip / a = m^2 a / (s^2 + a^2 m^2) and c_out = s m / sqrt(s^2 + a^2 m^2) written
    # out: stable at a = 0 (zero-terminal SNR), and exactly the output's own motion when m = 1.
    norm = s.square() + (a * m).square()
    output_mean = mean_frame(output)
    motion = (a * s * (1 - m * m) * frame_motion(noisy) + m * norm.sqrt() * (output - output_mean)) / norm
    return output_mean + motion.to(output.dtype)


@dataclass
class MotionPreconditionedV(Parameterization):
    """v-prediction on motion-scaled latents (scale_motion), its motion preconditioned for data of std
    motion_std (motion_preconditioned_velocity; None = plain v on the scaled latents)."""

    prediction_type: str = "v_prediction"
    motion_scale: float = 1.0
    motion_std: Optional[float] = None

    @property
    def transforms_latents(self) -> bool:
        return self.motion_scale != 1.0

    def to_model_space(self, latents):
        return scale_motion(latents, self.motion_scale)

    def to_data_space(self, latents):
        return scale_motion(latents, 1.0 / self.motion_scale)

    def prediction(self, output, noisy, alpha_bar):
        if self.motion_std is None:
            return output
        return motion_preconditioned_velocity(output.float(), noisy.float(), alpha_bar, self.motion_std)


@dataclass
class MotionWeighting(LossWeighting):
    """Uniform over timesteps; each latent location's error x motion_weights(latents, weight, floor)."""

    weight: float = 0.0
    floor: float = 0.1

    def element_weights(self, latents):
        return motion_weights(latents, self.weight, self.floor) if self.weight > 0 else None


# ------------------------------------------------------------------------------------------------- UNet
class DemoUNet3D(FaceVidUNet3D):
    """FaceVidUNet3D + a prompt -> layout prior added to its output.

    text_layout_size: from the pooled text (the mean of the real tokens' states), predict a coarse clean latent
        (out_channels x size x size, resized to the latent size, the same for every frame) and add it to the
        output, scaled per channel by a learned function of the timestep (+ pooled text) embedding. At high noise
        the target is mostly the clean video, and a direct prompt -> layout regression learns where each
        prompt's colours go in a few hundred steps, long before the UNet's own convolutions do (the demo's hair
        colours follow their prompts only with it). Guidance multiplies its prompt-dependent part: sample with
        low guidance (the demo: 1.5).
    text_motion_frames: > 0 adds to the layout a per-frame part, also from the pooled text (its own small MLP):
        text_motion_frames grids, resampled to the clip's frame count and made zero-mean over it. It learns a
        prompt's average motion, which is the action itself only where every clip of an action moves in step.
    Both heads' output layers start at zero: an untrained DemoUNet3D computes what its FaceVidUNet3D does.
    Every other keyword argument is FaceVidUNet3D's.
    """

    @register_to_config
    def __init__(self, text_layout_size: int = 16, text_motion_frames: int = 0, **kwargs):
        super().__init__(**kwargs)
        if text_layout_size < 1 or text_motion_frames < 0:
            raise ValueError(f"text_layout_size={text_layout_size} must be >= 1, text_motion_frames="
                             f"{text_motion_frames} >= 0.")
        text_dim, out_channels = self.config.cross_attention_dim, self.config.out_channels
        temb_channels = self.time_embedding.linear_2.out_features
        self.text_layout_head = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, 512), nn.SiLU(),
            nn.Linear(512, out_channels * text_layout_size**2),
        )
        nn.init.zeros_(self.text_layout_head[-1].weight)
        nn.init.zeros_(self.text_layout_head[-1].bias)
        # Starts at 1 for every timestep; training shapes it (the demo's ends near 1.6 at t=999, 0.1 at t=0).
        self.text_layout_gate = nn.Linear(temb_channels, out_channels)
        nn.init.zeros_(self.text_layout_gate.weight)
        nn.init.ones_(self.text_layout_gate.bias)
        self.text_motion_head = None
        if text_motion_frames:
            self.text_motion_head = nn.Sequential(
                nn.LayerNorm(text_dim), nn.Linear(text_dim, 256), nn.SiLU(),
                nn.Linear(256, out_channels * text_motion_frames * text_layout_size**2),
            )
            nn.init.zeros_(self.text_motion_head[-1].weight)
            nn.init.zeros_(self.text_motion_head[-1].bias)

    @staticmethod
    def _get_init_keys(input_class):
        # FaceVidUNet3D's arguments reach it through **kwargs: from_pretrained must keep them too.
        return ConfigMixin._get_init_keys(input_class) | ConfigMixin._get_init_keys(FaceVidUNet3D)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None, condition=None,
                temporal=True):
        # temporal=False: a still-image batch of joint image + video training (the layout prior still applies).
        out = super().forward(sample, timestep, encoder_hidden_states, encoder_attention_mask, condition, temporal)
        model_input = sample if condition is None else torch.cat([sample, condition], dim=1)
        temb, pooled_text = self.embed_conditions(timestep, encoder_hidden_states, encoder_attention_mask,
                                                  model_input)
        batch_size, num_frames, size = sample.shape[0], sample.shape[2], self.config.text_layout_size
        grid = self.text_layout_head(pooled_text).view(batch_size, -1, 1, size, size)
        if self.text_motion_head is not None:
            motion = self.text_motion_head(pooled_text).view(batch_size, -1, self.config.text_motion_frames,
                                                             size, size)
            motion = F.interpolate(motion, size=(num_frames, size, size), mode="trilinear", align_corners=False)
            grid = grid + motion - motion.mean(dim=2, keepdim=True)  # motion only: the layout keeps the mean
        grid = F.interpolate(grid, size=(num_frames, *sample.shape[-2:]), mode="trilinear", align_corners=False)
        return out + self.text_layout_gate(F.silu(temb))[:, :, None, None, None] * grid


# ----------------------------------------------------------------------------------------------- stages
class DemoVAEStage(VAEStage):
    def extra_loss(self, reconstruction, frames):
        weight = options(self.cfg).vae_edge_loss_weight
        if weight <= 0:
            return None, {}
        # The difference of neighbouring pixels' errors = the error in the image's gradient.
        error = reconstruction.float() - frames.float()
        edge = error.diff(dim=-1).pow(2).mean() + error.diff(dim=-2).pow(2).mean()
        return weight * edge, {"edge": edge.detach()}


class DemoTextToVideoStage(TextToVideoStage):
    def build_objective(self) -> Objective:
        o, objective = options(self.cfg), super().build_objective()
        if o.motion_scale != 1.0 or o.motion_std is not None:
            objective.parameterization = MotionPreconditionedV(
                objective.parameterization.prediction_type, o.motion_scale, o.motion_std)
        if o.motion_loss_weight > 0:
            objective.weighting = MotionWeighting(o.motion_loss_weight, o.motion_floor)
        return objective

    def new_unet(self, **kwargs) -> FaceVidUNet3D:
        o = options(self.cfg)
        if not o.text_layout:
            return super().new_unet(**kwargs)
        return DemoUNet3D(text_layout_size=o.text_layout_size, text_motion_frames=o.text_motion_frames, **kwargs)


STAGES = {"vae": DemoVAEStage, "t2v": DemoTextToVideoStage}
