import pytest
import torch

from facevid.diffusion import build_noise_scheduler, build_sampler
from facevid.objective import (
    LossWeighting,
    MinSNRWeighting,
    MixedFrameNoise,
    NoisePrior,
    Objective,
    Parameterization,
    video_noise,
)
from facevid.schema import DiffusionConfig


def _objective(**kw):
    cfg = DiffusionConfig(**kw)
    return Objective.from_config(cfg, build_noise_scheduler(cfg))


def exact_target(objective, latents, noisy, t):
    """The target the objective trains towards (a plain parameterisation's), recovered from the noisy input and
    the clean latents."""
    alpha = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    noise = (noisy - alpha.sqrt() * latents) / (1 - alpha).sqrt()
    if objective.parameterization.prediction_type == "epsilon":
        return noise
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_zero_for_the_exact_target(prediction_type):
    """A model that returns the true target scores 0: checks noising and targets agree."""
    objective = _objective(prediction_type=prediction_type, min_snr_gamma=5.0)
    latents = torch.randn(3, 4, 2, 4, 4)
    seen = {}

    def oracle(noisy, t):
        seen["t"] = t
        return exact_target(objective, latents, noisy, t)

    loss = objective.loss(oracle, latents, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    wrong = objective.loss(lambda noisy, t: torch.zeros_like(noisy), latents, torch.Generator().manual_seed(0))
    assert wrong.item() > 0.01


def test_same_generator_state_same_loss():
    objective = _objective(offset_noise=0.1)
    latents = torch.randn(2, 4, 2, 4, 4)
    model = lambda x, t: x * 0.5  # noqa: E731
    a = objective.loss(model, latents, torch.Generator().manual_seed(3))
    b = objective.loss(model, latents, torch.Generator().manual_seed(3))
    c = objective.loss(model, latents, torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_min_snr_weighting_changes_the_loss():
    latents = torch.randn(4, 4, 2, 4, 4)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = _objective(min_snr_gamma=None).loss(model, latents, torch.Generator().manual_seed(0))
    weighted = _objective(min_snr_gamma=1.0).loss(model, latents, torch.Generator().manual_seed(0))
    assert weighted < plain  # v-prediction weights min(snr, 1) / (snr + 1) <= 1


def test_zero_terminal_snr_and_samplers():
    scheduler = build_noise_scheduler(DiffusionConfig(zero_terminal_snr=True))
    assert scheduler.alphas_cumprod[-1] < 1e-6  # the last training step is pure noise
    for name in ("ddim", "dpm++"):
        sampler = build_sampler(scheduler.config, name)
        sampler.set_timesteps(5)
        assert int(sampler.timesteps[0]) == 999  # trailing spacing starts at the pure-noise step
        assert sampler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="ddim, dpm"):
        build_sampler(scheduler.config, "euler")


def test_samplers_take_the_same_timesteps_from_a_config_in_memory_and_from_its_file(tmp_path):
    """Validation builds its sampler from the training scheduler's config in memory, sample.py and export from
    scheduler_config.json: the same timesteps (they differed: DPM++ fell back to its own default spacing)."""
    from diffusers import DDPMScheduler

    scheduler = build_noise_scheduler(DiffusionConfig())
    scheduler.save_pretrained(tmp_path)
    from_file = DDPMScheduler.load_config(tmp_path)
    for name in ("dpm++", "ddim"):
        in_memory, saved = build_sampler(scheduler.config, name), build_sampler(from_file, name)
        in_memory.set_timesteps(25), saved.set_timesteps(25)
        assert torch.equal(in_memory.timesteps, saved.timesteps), name
        assert in_memory.config.timestep_spacing == "leading"


def test_video_noise_frame_correlation():
    # rho = 0 is plain torch.randn (so runs without the option are unchanged, draw for draw).
    plain = torch.randn((2, 4, 8, 6, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(video_noise((2, 4, 8, 6, 6), torch.Generator().manual_seed(3)), plain)

    for rho in (0.5, 0.8):
        noise = video_noise((64, 4, 8, 16, 16), torch.Generator().manual_seed(0), frame_correlation=rho)
        assert abs(noise.std().item() - 1.0) < 0.01  # still unit variance element-wise
        frames = noise.transpose(0, 2).reshape(8, -1)  # frame axis first
        corr = torch.corrcoef(frames)
        off_diagonal = corr[~torch.eye(8, dtype=torch.bool)]
        assert (off_diagonal - rho).abs().max() < 0.02, (rho, off_diagonal)
    # Unbatched (C, F, h, w), as the sampler draws one video at a time.
    single = video_noise((4, 8, 6, 6), torch.Generator().manual_seed(1), frame_correlation=0.9)
    assert single.shape == (4, 8, 6, 6)


def test_objective_trains_and_samples_with_correlated_noise():
    objective = _objective(frame_noise_correlation=0.8)
    latents = torch.randn(2, 4, 8, 4, 4)
    expected = video_noise(latents.shape, torch.Generator().manual_seed(5), 0.8)
    assert torch.equal(objective.noise_like(latents, torch.Generator().manual_seed(5)), expected)
    assert torch.equal(objective.initial_noise(latents.shape, torch.Generator().manual_seed(5)), expected)


def test_objective_is_chosen_by_config_and_saved_as_a_dict(tmp_path):
    """Trainer, sampler and export read one saved dict; it rebuilds the same parts, plug-ins by 'module:Class'."""
    objective = _objective(frame_noise_correlation=0.5, min_snr_gamma=3.0, offset_noise=0.05,
                           prediction_type="epsilon")
    assert objective.to_dict() == {"noise_prior": {"type": "mixed_frames", "correlation": 0.5},
                                   "parameterization": {"type": "plain", "prediction_type": "epsilon"},
                                   "weighting": {"type": "min_snr", "gamma": 3.0}, "offset_noise": 0.05}
    objective.save(tmp_path / "objective.json")
    again = Objective.load(tmp_path / "objective.json")
    assert (again.noise_prior, again.parameterization, again.weighting, again.offset_noise) == (
        MixedFrameNoise(0.5), Parameterization("epsilon"), MinSNRWeighting(3.0), 0.05)
    plain = _objective(min_snr_gamma=None)
    assert (plain.noise_prior, plain.weighting) == (NoisePrior(), LossWeighting())
    assert plain.unet3d_incompatibilities() == [] and "frame-correlated" in again.unet3d_incompatibilities()[0]

    # A plug-in part: any subclass, from any module, saved and rebuilt by its import path.
    from demo.aids import MotionWeighting

    spec = Objective(weighting=MotionWeighting(2.0)).to_dict()
    assert spec["weighting"] == {"type": "demo.aids:MotionWeighting", "weight": 2.0, "floor": 0.1}
    assert Objective.from_dict(spec).weighting == MotionWeighting(2.0)
    for bad, message in [({"type": "nope"}, "unknown objective weighting 'nope'"),
                         ({"type": "demo.aids:Missing"}, "cannot be imported"),
                         ({"type": "independent"}, "is not a LossWeighting")]:
        with pytest.raises(ValueError, match=message):
            Objective.from_dict({**spec, "weighting": bad})
