"""The diffusion objective: noise schedule, what the UNet predicts, and how the loss is weighted.

Schedules and samplers come from diffusers; this module only decides how they are combined.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr

from facevid.config import ConfigError, DiffusionConfig
from models.pretrained import pretrained_scheduler_config

SAMPLERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def build_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        clip_sample=False,
    )


# The settings that define what a trained UNet's timesteps and outputs mean.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def pretrained_schedule_mismatches(scheduler_config: dict, cfg: DiffusionConfig) -> dict[str, tuple]:
    """{KEY: (run value, pretrained value)} for each SCHEDULE_KEYS setting where the run's diffusion config differs
    from a pretrained pipeline's scheduler config (keys it omits take diffusers' defaults, which it then used).
    zero_terminal_snr is not compared: rescaling the same betas to zero terminal SNR is a deliberate fine-tuning
    change (Lin et al. 2023 fine-tune Stable Diffusion that way)."""
    defaults = inspect.signature(DDPMScheduler.__init__).parameters
    mismatches = {}
    for key in SCHEDULE_KEYS:
        ours, theirs = getattr(cfg, key), scheduler_config.get(key, defaults[key].default)
        same = math.isclose(ours, theirs, rel_tol=1e-6) if isinstance(ours, float) else ours == theirs
        if not same:
            mismatches[key] = (ours, theirs)
    return mismatches


def check_pretrained_schedule(pretrained: str, subfolder: str | None, cfg: DiffusionConfig) -> None:
    """Refuse a run whose noise schedule differs from the one its pretrained UNet was trained with (when the
    pretrained pipeline ships scheduler/scheduler_config.json).

    Refused rather than adopted: the run's config.yaml stays the one record of the objective that sampling and
    export read, and a mismatch is nearly always a mistake (a UNet trained on other noise levels, or with other
    targets, starts training from a broken function)."""
    found = pretrained_scheduler_config(pretrained, subfolder)
    if found is None:
        return
    scheduler_config, where = found
    mismatches = pretrained_schedule_mismatches(scheduler_config, cfg)
    if mismatches:
        problems = "; ".join(f"diffusion.{key}: run {ours!r}, pretrained {theirs!r}"
                             for key, (ours, theirs) in mismatches.items())
        fix = " ".join(f"diffusion.{key}={theirs}" for key, (_, theirs) in mismatches.items())
        raise ConfigError(f"config key 'unet.pretrained' = {pretrained!r}: its noise schedule ({where}) differs "
                          f"from the run's: {problems}. Train with the pretrained schedule ({fix}), or start "
                          "from another UNet.")


def build_sampler(train_scheduler_config, name: str):
    """An inference scheduler that shares the training schedule (betas, prediction type)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SAMPLERS)}")
    extra = {}
    if train_scheduler_config.get("rescale_betas_zero_snr"):
        # A zero-terminal-SNR model must start sampling from the pure-noise step.
        extra["timestep_spacing"] = "trailing"
    if name == "dpm++":
        extra["algorithm_type"] = "dpmsolver++"
        extra["solver_order"] = 2
    return SAMPLERS[name].from_config(train_scheduler_config, **extra)


def video_noise(shape, generator: torch.Generator, frame_correlation: float = 0.0, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Unit Gaussian noise for latents whose frame axis is dim -3 ((B, C, F, h, w) or (C, F, h, w)).

    frame_correlation rho > 0 mixes in one draw shared by all frames (a "mixed noise" prior, PYoCo, Ge et al.
    2023): every element stays N(0, 1), and any two frames' noise has correlation rho, so frames start out
    alike (meant for models that have not learnt temporal consistency yet; README, Evaluation, for what it did
    to the demo). Training and sampling must use the same rho. rho = 0 draws exactly what torch.randn draws.
    """
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if frame_correlation > 0:
        shared_shape = tuple(shape[:-3]) + (1,) + tuple(shape[-2:])
        shared = torch.randn(shared_shape, generator=generator, device=device, dtype=dtype)
        noise = (1.0 - frame_correlation) ** 0.5 * noise + frame_correlation ** 0.5 * shared
    return noise


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


# A clip whose most moving location moves less than this (RMS over channels and frames, in the latents the
# loss sees, i.e. after motion_scale) is not stretched to full weight: its weights grow in proportion to its
# motion. In the demo's latents at motion_scale 4 a still clip's VAE jitter peaks at ~0.03 (weights up to
# 1 + 0.3 w), a talking mouth at ~0.9 and a nodding head at ~3.7 (both 1 + w at their peak).
MOTION_FLOOR = 0.1


def motion_weights(latents: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-location loss weights (B, 1, 1, h, w) for clean latents (B, C, F, h, w): 1 + weight x how far the
    location's frames deviate from their mean (RMS over channels and frames), relative to the clip's most
    moving location (or to MOTION_FLOOR when that is smaller).

    Why: the loss is an average over every latent element, and a talking mouth is one or two locations of
    an 8x8 latent moving by a seventh of what a nodding head does (bench/latent_motion.py), so its share of
    the loss, and of the gradient that ties the word "talking" to it, is ~1%. Normalising by the clip's own
    peak gives every moving clip's moving part the same extra weight, however small the motion.
    """
    amount = frame_motion(latents).float().square().mean(dim=(1, 2), keepdim=True).sqrt()
    peak = amount.amax(dim=(-2, -1), keepdim=True).clamp(min=MOTION_FLOOR)
    return 1.0 + weight * amount / peak


def motion_preconditioned_velocity(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                                   motion_std: float) -> torch.Tensor:
    """The v-prediction that a UNet output means when its motion part is preconditioned for motion of std
    `motion_std` (diffusion.motion_std). Latents (B, C, F, h, w) or (C, F, h, w); alpha_bar: one per video.

    Plain v-prediction predicts the clean latents as a x_t - s v (x_t = a x0 + s noise, a^2 + s^2 = 1), the
    preconditioning of Karras et al. (EDM, 2022) for data of unit std. That fits the mean frame, but the
    frames' deviation from it (the motion) has std ~0.1 in the demo's latents: there, the skip term a x_t
    copies each frame's own noise into the predicted clean clip, and the network has to learn to cancel it
    exactly, or the frames flicker (the demo's 7.9 grey levels frame to frame for "still" prompts). Here the
    mean frame keeps that parameterisation and the motion uses EDM's c_skip and c_out for sigma = s / a and
    data std m: predicted motion = c_skip dev(x_t) / a - c_out dev(output), so at high noise the skip is
    ~(m / sigma)^2 and an unsure network predicts still frames; the network's output there has unit std.
    The result is returned as the equivalent velocity (a dev(x_t) - predicted motion) / s, so the loss (the
    same v-MSE, i.e. the same weighting of clean-latent errors) and diffusers' samplers are unchanged.
    motion_std = 1 is plain v-prediction.
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


class DiffusionObjective:
    """Turns clean latents into a noisy input + target and weights the per-sample MSE."""

    def __init__(self, scheduler: DDPMScheduler, cfg: DiffusionConfig):
        self.scheduler = scheduler
        self.cfg = cfg

    def noise_like(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = video_noise(latents.shape, generator, self.cfg.frame_noise_correlation, latents.device, latents.dtype)
        if self.cfg.offset_noise:
            # A per-(sample, channel) constant lets the model learn global brightness / colour shifts.
            b, c = latents.shape[:2]
            offset = torch.randn((b, c) + (1,) * (latents.ndim - 2), generator=generator, device=latents.device)
            noise = noise + self.cfg.offset_noise * offset.to(latents.dtype)
        return noise

    def loss(self, model_fn, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """model_fn(noisy_latents, timesteps) -> prediction; returns the scalar training loss."""
        batch = latents.shape[0]
        noise = self.noise_like(latents, generator)
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
        )
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.cfg.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        prediction = model_fn(noisy, timesteps)
        if self.cfg.motion_std is not None:
            alpha_bar = self.scheduler.alphas_cumprod.to(latents.device)[timesteps]
            prediction = motion_preconditioned_velocity(prediction.float(), noisy.float(), alpha_bar,
                                                        self.cfg.motion_std)
        squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        if self.cfg.motion_loss_weight > 0:
            squared_error = squared_error * motion_weights(latents, self.cfg.motion_loss_weight)
        per_sample = squared_error.mean(dim=tuple(range(1, latents.ndim)))
        if self.cfg.min_snr_gamma is None:
            return per_sample.mean()
        # Min-SNR-gamma: cap the weight of easy (low-noise) steps so they do not dominate training.
        snr = compute_snr(self.scheduler, timesteps)
        capped = torch.clamp(snr, max=self.cfg.min_snr_gamma)
        weight = capped / (snr + 1) if self.cfg.prediction_type == "v_prediction" else capped / snr.clamp(min=1e-8)
        return (per_sample * weight).mean()
