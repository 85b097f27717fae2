"""The noise schedule and the samplers: diffusers' own, configured from diffusion.* (what the UNet predicts and
how the loss is weighted is the objective's business: facevid/objective.py)."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from facevid.config import DiffusionConfig

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
