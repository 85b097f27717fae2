import pytest
import torch

from facevid.config import DiffusionConfig
from facevid.diffusion import (
    DiffusionObjective,
    build_noise_scheduler,
    build_sampler,
    frame_motion,
    mean_frame,
    motion_preconditioned_velocity,
    motion_weights,
    scale_motion,
    video_noise,
)


def _objective(**kw):
    cfg = DiffusionConfig(**kw)
    return DiffusionObjective(build_noise_scheduler(cfg), cfg)


def _exact_target(objective, latents, noisy, t):
    """The target the objective trains towards, recovered from the noisy input and the clean latents."""
    alpha = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    noise = (noisy - alpha.sqrt() * latents) / (1 - alpha).sqrt()
    if objective.cfg.prediction_type == "epsilon":
        return noise
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    if objective.cfg.motion_std is None:
        return velocity
    # The output whose preconditioned velocity is the true one: motion_preconditioned_velocity solved for it.
    a, s, m = alpha.sqrt(), (1 - alpha).sqrt(), objective.cfg.motion_std
    norm = s.square() + (a * m).square()
    motion = norm * frame_motion(velocity) - a * s * (1 - m * m) * frame_motion(noisy)
    return mean_frame(velocity) + motion / (m * norm.sqrt())


@pytest.mark.parametrize("prediction_type,motion_std", [("epsilon", None), ("v_prediction", None),
                                                        ("v_prediction", 0.1)])
def test_loss_is_zero_for_the_exact_target(prediction_type, motion_std):
    """A model that returns the true target scores 0: checks noising and targets agree."""
    objective = _objective(prediction_type=prediction_type, min_snr_gamma=5.0, motion_std=motion_std)
    latents = torch.randn(3, 4, 2, 4, 4)
    seen = {}

    def oracle(noisy, t):
        seen["t"] = t
        return _exact_target(objective, latents, noisy, t)

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


def test_objective_trains_with_correlated_noise():
    cfg = DiffusionConfig(frame_noise_correlation=0.8)
    objective = DiffusionObjective(build_noise_scheduler(cfg), cfg)
    latents = torch.randn(2, 4, 8, 4, 4)
    expected = video_noise(latents.shape, torch.Generator().manual_seed(5), 0.8)
    assert torch.equal(objective.noise_like(latents, torch.Generator().manual_seed(5)), expected)


def test_scale_motion_keeps_the_mean_frame_and_inverts():
    latents = torch.randn((2, 4, 8, 3, 3), generator=torch.Generator().manual_seed(0))
    assert scale_motion(latents, 1.0) is latents
    scaled = scale_motion(latents, 4.0)
    mean = latents.mean(dim=2, keepdim=True)
    torch.testing.assert_close(scaled.mean(dim=2, keepdim=True), mean)  # appearance untouched
    torch.testing.assert_close(scaled - mean, 4.0 * (latents - mean))  # every frame's motion x4
    torch.testing.assert_close(scale_motion(scaled, 0.25), latents)  # what the sampler undoes
    still = latents[:, :, :1].expand(-1, -1, 8, -1, -1)
    torch.testing.assert_close(scale_motion(still, 4.0), still)  # a still clip has no motion to scale
    single = latents[0]  # unbatched (C, F, h, w): the frame axis is still dim -3
    torch.testing.assert_close(scale_motion(single, 4.0), scaled[0])


def test_motion_weights_put_the_extra_weight_where_the_clip_moves():
    """A clip whose one location oscillates gets 1 + w there and 1 elsewhere, however small the motion (above
    the floor); a still clip gets 1 everywhere; motion below the floor counts in proportion."""
    base = torch.randn((1, 4, 1, 4, 4), generator=torch.Generator().manual_seed(0)).expand(3, -1, 8, -1, -1).clone()
    wave = torch.tensor([1.0, -1.0] * 4)
    base[0, :, :, 1, 2] += 0.5 * wave  # big motion at (1, 2)
    base[1, :, :, 3, 0] += 0.2 * wave  # small motion at (3, 0), still above the floor (RMS 0.2)
    base[2, :, :, 0, 0] += 0.05 * wave  # half the floor
    weights = motion_weights(base, 4.0)
    assert weights.shape == (3, 1, 1, 4, 4)
    expected = torch.ones(3, 4, 4)
    expected[0, 1, 2] = expected[1, 3, 0] = 5.0
    expected[2, 0, 0] = 1.0 + 4.0 * 0.05 / 0.1
    torch.testing.assert_close(weights[:, 0, 0], expected)
    torch.testing.assert_close(motion_weights(base[:, :, :1].expand(-1, -1, 8, -1, -1), 4.0), torch.ones(3, 1, 1, 4, 4))


def test_motion_loss_weight_multiplies_the_error_at_moving_locations():
    latents = torch.randn((1, 4, 1, 4, 4), generator=torch.Generator().manual_seed(1)).expand(1, -1, 8, -1, -1).clone()
    latents[0, :, :, 2, 2] += torch.tensor([1.0, -1.0] * 4)

    def loss(weight, error_at):
        objective = _objective(min_snr_gamma=None, motion_loss_weight=weight)

        def off_by_one_at(noisy, t):  # the exact target, plus 1 at one location
            target = _exact_target(objective, latents, noisy, t)
            target[:, :, :, error_at[0], error_at[1]] += 1.0
            return target

        return objective.loss(off_by_one_at, latents, torch.Generator().manual_seed(0)).item()

    assert loss(0.0, (2, 2)) == pytest.approx(1 / 16, rel=1e-4)  # one of 16 locations off by 1
    assert loss(3.0, (2, 2)) == pytest.approx(4 / 16, rel=1e-4)  # the moving one: weight 1 + 3
    assert loss(3.0, (0, 1)) == pytest.approx(1 / 16, rel=1e-4)  # a location that does not move


def test_motion_std_preconditions_the_motion_for_data_of_that_std():
    """diffusion.motion_std=m: the clean clip it implies is EDM's c_skip x + c_out F on the motion (sigma = s / a,
    data std m) and plain v-prediction on the mean frame; m = 1 is plain v-prediction."""
    scheduler = build_noise_scheduler(DiffusionConfig())
    t = torch.tensor([0, 500, 999])
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    noisy, output = torch.randn(3, 4, 8, 4, 4), torch.randn(3, 4, 8, 4, 4)

    torch.testing.assert_close(motion_preconditioned_velocity(output, noisy, alpha.flatten(), 1.0), output)
    m = 0.1
    velocity = motion_preconditioned_velocity(output, noisy, alpha.flatten(), m)
    clean = a * noisy - s * velocity
    sigma = s / a
    c_skip, c_out = m**2 / (sigma**2 + m**2), sigma * m / (sigma**2 + m**2).sqrt()
    torch.testing.assert_close(frame_motion(clean), c_skip * frame_motion(noisy) / a - c_out * frame_motion(output))
    torch.testing.assert_close(mean_frame(clean), mean_frame(a * noisy - s * output))

    # An output of zero (an untrained, unsure network): plain v-prediction copies the input's frame-to-frame
    # differences into the clean clip at every noise level (a x_t), so the frames flicker; preconditioned, the
    # high-noise prediction is a still clip, and only at low noise is the input (by then clean) passed through.
    zero = torch.zeros_like(noisy)
    plain = frame_motion(a * noisy - s * zero).square().mean(dim=(1, 2, 3, 4)).sqrt()
    still = frame_motion(a * noisy - s * motion_preconditioned_velocity(zero, noisy, alpha.flatten(), m))
    ratio = still.square().mean(dim=(1, 2, 3, 4)).sqrt() / plain
    assert ratio[2] < 0.02 and ratio[0] > 0.95
