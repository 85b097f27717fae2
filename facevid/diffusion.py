"""The noise schedule and the samplers: diffusers' own, configured from diffusion.* (what the UNet predicts and
how the loss is weighted is the objective's business: facevid/objective.py)."""

from __future__ import annotations

import inspect
import math

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from facevid.schema import ConfigError, DiffusionConfig
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
    # The spacing is always passed: a config held in memory lists the keys it left at their defaults
    # (`_use_default_values`), and from_config gives those the sampler's own defaults ("linspace" for DPM++),
    # while the same config read back from scheduler_config.json names "leading". Validation (in memory) and
    # sample.py / export (from the file) must draw the same timesteps.
    extra = {"timestep_spacing": train_scheduler_config.get("timestep_spacing", "leading")}
    if train_scheduler_config.get("rescale_betas_zero_snr"):
        # A zero-terminal-SNR model must start sampling from the pure-noise step.
        extra["timestep_spacing"] = "trailing"
    if name == "dpm++":
        extra["algorithm_type"] = "dpmsolver++"
        extra["solver_order"] = 2
    return SAMPLERS[name].from_config(train_scheduler_config, **extra)
