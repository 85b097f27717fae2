"""The diffusion objective: ONE object that training, sampling and export all read.

    Objective = NoisePrior       the noise training adds and sampling starts from
              + Parameterization what the UNet's output means, and in which latent space it works
              + LossWeighting    how each sample's (and each latent element's) squared error counts
              (+ offset noise, a training-only extra)

Each part is chosen by config (`Objective.from_config`, diffusion.*) and saved with the run as a dict
(RUN/objective.json: `Objective.to_dict`), which is all the sampler (facevid/pipeline.py) and an exported
pipeline (facevid/export.py) need to repeat what training did.

Extension point: a part may be any subclass of these classes, from any module. The saved dict names it by
"module:Class" and is rebuilt from that name, so plug-ins need no registration; the CPU demo's own
parameterisation and loss weighting (demo/aids.py) plug in this way.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from facevid.schema import DiffusionConfig


def video_noise(shape, generator: torch.Generator, frame_correlation: float = 0.0, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Unit Gaussian noise for latents whose frame axis is dim -3 ((B, C, F, h, w) or (C, F, h, w)).

    frame_correlation rho > 0 mixes in one draw shared by all frames (a "mixed noise" prior, PYoCo, Ge et al.
    2023): every element stays N(0, 1), and any two frames' noise has correlation rho, so frames start out
    alike (meant for models that have not learnt temporal consistency yet; docs/experiments.md for what it did
    to the demo). Training and sampling must use the same rho. rho = 0 draws exactly what torch.randn draws.
    """
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if frame_correlation > 0:
        shared_shape = tuple(shape[:-3]) + (1,) + tuple(shape[-2:])
        shared = torch.randn(shared_shape, generator=generator, device=device, dtype=dtype)
        noise = (1.0 - frame_correlation) ** 0.5 * noise + frame_correlation ** 0.5 * shared
    return noise


class _Part:
    """A dataclass whose fields are its whole state: saved as {"type": name, **fields}."""

    builtin_name: str | None = None  # short name of the core's own parts; plug-ins are saved as "module:Class"

    def to_dict(self) -> dict:
        own = type(self).__dict__.get("builtin_name")
        name = own or f"{type(self).__module__}:{type(self).__qualname__}"
        return {"type": name, **dataclasses.asdict(self)}

    def unet3d_incompatibility(self) -> str | None:
        """Why diffusers' TextToVideoSDPipeline could not repeat this part (None: it can). Plug-ins never can."""
        if type(self).__dict__.get("builtin_name") is None:
            return f"it was trained with {type(self).__module__}:{type(self).__qualname__}, a plug-in"
        return None


# ----------------------------------------------------------------------------------------------- noise prior
@dataclass
class NoisePrior(_Part):
    """Independent unit Gaussian noise for every latent element."""

    builtin_name = "independent"

    def sample(self, shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
        return video_noise(shape, generator, 0.0, device, dtype)


@dataclass
class MixedFrameNoise(NoisePrior):
    """PYoCo's mixed noise: any two frames' noise has correlation `correlation` (see video_noise)."""

    builtin_name = "mixed_frames"
    correlation: float = 0.0

    def sample(self, shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
        return video_noise(shape, generator, self.correlation, device, dtype)

    def unet3d_incompatibility(self) -> str | None:
        return (f"it was trained with frame-correlated noise (diffusion.frame_noise_correlation={self.correlation}; "
                "TextToVideoSDPipeline draws independent noise per frame)")


# ------------------------------------------------------------------------------------------ parameterisation
@dataclass
class Parameterization(_Part):
    """The UNet predicts `prediction_type` (epsilon | v_prediction) of plain latents, as diffusers' schedulers
    read it. Plug-ins may diffuse transformed latents (to_model_space / to_data_space) or read the UNet's output
    as something else (prediction), as long as `prediction` returns what `prediction_type` names."""

    builtin_name = "plain"
    prediction_type: str = "v_prediction"

    # True when to_model_space changes the latents: then image-to-video, which writes a given first frame into
    # the latents being sampled, cannot use it.
    transforms_latents = False

    def to_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents (B, C, F, h, w) -> what the diffusion process runs on."""
        return latents

    def to_data_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents -> what the VAE decodes (the inverse of to_model_space)."""
        return latents

    def target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return scheduler.get_velocity(latents, noise, timesteps)

    def prediction(self, output: torch.Tensor, noisy: torch.Tensor, alpha_bar) -> torch.Tensor:
        """The UNet's output as a `prediction_type` prediction, for latents `noisy` at noise level alpha_bar
        (one per video, or one for all)."""
        return output


# ----------------------------------------------------------------------------------------------- weighting
@dataclass
class LossWeighting(_Part):
    """Every sample and every latent element counts the same."""

    builtin_name = "uniform"

    def element_weights(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Per-element weights broadcastable to the latents (model space), or None. The hook for per-pixel
        weighting (e.g. the demo's motion-weighted loss)."""
        return None

    def timestep_weights(self, scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor | None:
        """One weight per sample from its timestep, or None."""
        return None


@dataclass
class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023): cap the weight of easy (low-noise) steps so they do not dominate."""

    builtin_name = "min_snr"
    gamma: float = 5.0

    def timestep_weights(self, scheduler, timesteps, prediction_type):
        snr = compute_snr(scheduler, timesteps)
        capped = torch.clamp(snr, max=self.gamma)
        return capped / (snr + 1) if prediction_type == "v_prediction" else capped / snr.clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------- objective
_BUILTIN = {cls.builtin_name: cls for cls in (NoisePrior, MixedFrameNoise, Parameterization, LossWeighting,
                                              MinSNRWeighting)}
_BASES = {"noise_prior": NoisePrior, "parameterization": Parameterization, "weighting": LossWeighting}


def _part_from_dict(role: str, spec: dict) -> _Part:
    spec = dict(spec)
    name = spec.pop("type")
    if name in _BUILTIN:
        cls = _BUILTIN[name]
    elif ":" in name:
        module, _, qualname = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), qualname)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"objective {role} {name!r} cannot be imported ({err}): is its package installed?") \
                from None
    else:
        raise ValueError(f"unknown objective {role} {name!r}: one of {', '.join(_BUILTIN)} or 'module:Class'")
    if not issubclass(cls, _BASES[role]):
        raise ValueError(f"objective {role} {name!r} is not a {_BASES[role].__name__}")
    return cls(**spec)


class Objective:
    """Noise prior + parameterisation + loss weighting (+ offset noise for training). `scheduler` (the training
    DDPMScheduler) is needed by `loss` only; sampling uses its own scheduler."""

    def __init__(self, noise_prior: NoisePrior | None = None, parameterization: Parameterization | None = None,
                 weighting: LossWeighting | None = None, offset_noise: float = 0.0, scheduler=None):
        self.noise_prior = noise_prior or NoisePrior()
        self.parameterization = parameterization or Parameterization()
        self.weighting = weighting or LossWeighting()
        self.offset_noise = offset_noise
        self.scheduler = scheduler

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, scheduler=None) -> Objective:
        rho = cfg.frame_noise_correlation
        return cls(noise_prior=MixedFrameNoise(rho) if rho > 0 else NoisePrior(),
                   parameterization=Parameterization(cfg.prediction_type),
                   weighting=LossWeighting() if cfg.min_snr_gamma is None else MinSNRWeighting(cfg.min_snr_gamma),
                   offset_noise=cfg.offset_noise, scheduler=scheduler)

    # ------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"noise_prior": self.noise_prior.to_dict(), "parameterization": self.parameterization.to_dict(),
                "weighting": self.weighting.to_dict(), "offset_noise": self.offset_noise}

    @classmethod
    def from_dict(cls, spec: dict | None, scheduler=None) -> Objective:
        """From `to_dict`'s output; None = the plain objective (independent noise, plain v-prediction)."""
        if spec is None:
            return cls(scheduler=scheduler)
        parts = {role: _part_from_dict(role, spec[role]) for role in _BASES if role in spec}
        return cls(**parts, offset_noise=spec.get("offset_noise", 0.0), scheduler=scheduler)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, scheduler=None) -> Objective:
        return cls.from_dict(json.loads(Path(path).read_text()), scheduler)

    def unet3d_incompatibilities(self) -> list[str]:
        """Why TextToVideoSDPipeline could not sample like this objective; empty when it can."""
        reasons = [part.unet3d_incompatibility() for part in (self.noise_prior, self.parameterization, self.weighting)
                   if part is not self.weighting]  # the loss weighting only matters to training
        return [r for r in reasons if r]

    # ------------------------------------------------------------------------------------------ sampling
    def initial_noise(self, shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.noise_prior.sample(shape, generator, device, dtype)

    def prediction(self, output: torch.Tensor, noisy: torch.Tensor, alpha_bar) -> torch.Tensor:
        return self.parameterization.prediction(output, noisy, alpha_bar)

    def to_data_space(self, latents: torch.Tensor) -> torch.Tensor:
        return self.parameterization.to_data_space(latents)

    # ------------------------------------------------------------------------------------------ training
    def noise_like(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = self.noise_prior.sample(latents.shape, generator, latents.device, latents.dtype)
        if self.offset_noise:
            # A per-(sample, channel) constant lets the model learn global brightness / colour shifts.
            b, c = latents.shape[:2]
            offset = torch.randn((b, c) + (1,) * (latents.ndim - 2), generator=generator, device=latents.device)
            noise = noise + self.offset_noise * offset.to(latents.dtype)
        return noise

    def loss(self, model_fn, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """model_fn(noisy_latents, timesteps) -> UNet output; latents are clean data-space latents. Returns the
        scalar training loss."""
        scheduler, param = self.scheduler, self.parameterization
        latents = param.to_model_space(latents)
        batch = latents.shape[0]
        noise = self.noise_like(latents, generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = param.target(scheduler, latents, noise, timesteps)
        output = model_fn(noisy, timesteps)
        alpha_bar = scheduler.alphas_cumprod.to(latents.device)[timesteps]
        prediction = param.prediction(output, noisy, alpha_bar)
        squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        element_weights = self.weighting.element_weights(latents)
        if element_weights is not None:
            squared_error = squared_error * element_weights
        per_sample = squared_error.mean(dim=tuple(range(1, latents.ndim)))
        weights = self.weighting.timestep_weights(scheduler, timesteps, param.prediction_type)
        return per_sample.mean() if weights is None else (per_sample * weights).mean()
