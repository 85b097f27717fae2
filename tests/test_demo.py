"""The CPU demo's aids (demo/aids.py), plugged in through the framework's extension points: the recipe the demo
configs resolve to, motion scaling / preconditioning / weighting in training and sampling alike, the text layout
heads of DemoUNet3D, the VAE's edge loss, and the validation of the demo's options."""

from pathlib import Path

import numpy as np
import pytest
import task_runs
import torch
from test_diffusion import exact_target
from test_unet import TINY, make_inputs, padding_mask, randomize_zero_layers
from tiny import tiny_config

from demo.aids import (
    DemoTextToVideoStage,
    DemoUNet3D,
    DemoVAEStage,
    MotionPreconditionedV,
    MotionWeighting,
    frame_motion,
    mean_frame,
    motion_preconditioned_velocity,
    motion_weights,
    scale_motion,
)
from facevid.config import load_config
from facevid.diffusion import build_noise_scheduler, build_sampler
from facevid.objective import Objective
from facevid.pipeline import FaceVidPipeline
from facevid.schema import ConfigError, DiffusionConfig
from facevid.stages import build_stage
from models.unet3d import FaceVidUNet3D
from models.vae import decode_latents, sample_latents

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SAMPLING = dict(num_frames=4, resolution=16, num_inference_steps=3, guidance_scale=2.0)
DEMO = ["plugin.module=demo"]


# Tiny models: one thread is as fast, and fair to other processes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------ the recipe
@pytest.mark.parametrize("name,objective,layout", [
    ("demo", {"type": "demo.aids:MotionPreconditionedV", "prediction_type": "v_prediction", "motion_scale": 1.0,
              "motion_std": 0.1}, {"text_layout_size": 8, "text_motion_frames": 8}),
    ("demo_long", {"type": "demo.aids:MotionPreconditionedV", "prediction_type": "v_prediction",
                   "motion_scale": 4.0, "motion_std": None}, {"text_layout_size": 8, "text_motion_frames": 0}),
])
def test_demo_configs_resolve_to_the_demo_recipe(name, objective, layout, tmp_path):
    """The numbers configs/demo*.yaml trained with when these aids were core options (diffusion.motion_*,
    unet.text_*): moving them into demo/ must not change the recipe."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    (tmp_path / "vae").mkdir()
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"data.manifest={manifest}", f"vae.pretrained={tmp_path / 'vae'}"])
    stage = build_stage(cfg)
    assert type(stage) is DemoTextToVideoStage
    stage.noise_scheduler = build_noise_scheduler(cfg.diffusion)
    weight = {"demo": 2.0, "demo_long": 4.0}[name]
    assert stage.build_objective().to_dict() == {
        "noise_prior": {"type": "independent"}, "parameterization": objective,
        "weighting": {"type": "demo.aids:MotionWeighting", "weight": weight, "floor": 0.1}, "offset_noise": 0.0}
    unet = stage.new_unet(in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet.block_out_channels),
                            attention_levels=tuple(cfg.unet.attention_levels), cross_attention_dim=384,
                            pooled_text_conditioning=cfg.unet.pooled_text_conditioning)
    assert type(unet) is DemoUNet3D and {k: unet.config[k] for k in layout} == layout
    assert cfg.unet.block_out_channels == [32, 64, 128] and cfg.diffusion.min_snr_gamma is None
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.sample.guidance_scale) == (
        16, {"demo": 420, "demo_long": 4200}[name], 1.5)


def test_demo_options_are_validated(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    base = [f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "stage=vae", *DEMO]
    for overrides, message in [
        (["plugin.options.motion_scale=0"], "plugin.options.motion_scale.*> 0"),
        (["plugin.options.motion_std=0"], "plugin.options.motion_std.*> 0"),
        (["plugin.options.motion_std=0.1", "diffusion.prediction_type=epsilon"], "motion_std.*v_prediction"),
        (["plugin.options.motion_loss_weight=-2"], "plugin.options.motion_loss_weight.*>= 0"),
        (["plugin.options.motion_loss_weight=2", "diffusion.min_snr_gamma=5"], "min_snr_gamma=null"),
        (["plugin.options.vae_edge_loss_weight=-1"], "vae_edge_loss_weight"),
        (["plugin.options.text_layout_size=0"], "text_layout_size"),
        (["plugin.options.text_motion_frames=8"], "text_motion_frames.*text_layout=true"),
        (["plugin.options.motion_scale=2", "task=i2v"], "motion_scale.*i2v"),
        (["plugin.options.motion_sclae=2"], "plugin.options.motion_sclae.*valid keys: motion_scale"),
        (["plugin.options.text_layout=maybe"], "plugin.options.text_layout"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + overrides)


# ------------------------------------------------------------------------------------------ motion
def _objective(motion_std=None, motion_scale=1.0, weight=0.0, **kw):
    cfg = DiffusionConfig(**kw)
    objective = Objective.from_config(cfg, build_noise_scheduler(cfg))
    objective.parameterization = MotionPreconditionedV(cfg.prediction_type, motion_scale, motion_std)
    if weight:
        objective.weighting = MotionWeighting(weight)
    return objective


def _preconditioned_target(objective, latents, noisy, t):
    """The output whose preconditioned velocity is the true one: motion_preconditioned_velocity solved for it."""
    velocity = exact_target(objective, latents, noisy, t)
    alpha = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    a, s, m = alpha.sqrt(), (1 - alpha).sqrt(), objective.parameterization.motion_std
    norm = s.square() + (a * m).square()
    motion = norm * frame_motion(velocity) - a * s * (1 - m * m) * frame_motion(noisy)
    return mean_frame(velocity) + motion / (m * norm.sqrt())


def test_motion_preconditioned_loss_is_zero_for_the_exact_target():
    objective = _objective(motion_std=0.1, min_snr_gamma=5.0)
    latents = torch.randn(3, 4, 2, 4, 4)
    oracle = lambda noisy, t: _preconditioned_target(objective, latents, noisy, t)  # noqa: E731
    assert objective.loss(oracle, latents, torch.Generator().manual_seed(0)).item() < 1e-8
    zeros = objective.loss(lambda noisy, t: torch.zeros_like(noisy), latents, torch.Generator().manual_seed(0))
    assert zeros.item() > 0.01


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
        objective = _objective(min_snr_gamma=None, weight=weight)

        def off_by_one_at(noisy, t):  # the exact target, plus 1 at one location
            target = exact_target(objective, latents, noisy, t)
            target[:, :, :, error_at[0], error_at[1]] += 1.0
            return target

        return objective.loss(off_by_one_at, latents, torch.Generator().manual_seed(0)).item()

    assert loss(0.0, (2, 2)) == pytest.approx(1 / 16, rel=1e-4)  # one of 16 locations off by 1
    assert loss(3.0, (2, 2)) == pytest.approx(4 / 16, rel=1e-4)  # the moving one: weight 1 + 3
    assert loss(3.0, (0, 1)) == pytest.approx(1 / 16, rel=1e-4)  # a location that does not move


def test_motion_std_preconditions_the_motion_for_data_of_that_std():
    """motion_std=m: the clean clip it implies is EDM's c_skip x + c_out F on the motion (sigma = s / a, data std
    m) and plain v-prediction on the mean frame; m = 1 is plain v-prediction."""
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


def test_motion_scale_scales_what_is_trained_and_is_undone_before_decoding(tmp_path_factory, tmp_path,
                                                                         monkeypatch):
    stage, model, batch = task_runs.built_stage("t2v", tmp_path_factory, tmp_path, *DEMO,
                                                "plugin.options.motion_scale=4")
    trained = []
    monkeypatch.setattr(stage.objective, "noise_like", lambda latents, generator: trained.append(latents)
                        or torch.zeros_like(latents))
    stage.compute_loss(model, batch, torch.Generator().manual_seed(0))
    mean, std, _, _ = stage.encode_batch(batch)
    posterior = sample_latents(mean, std, stage.vae.config.scaling_factor, torch.Generator().manual_seed(0))
    torch.testing.assert_close(trained[0], scale_motion(posterior, 4.0))

    # Sampling runs the same trajectory and decodes it scaled back by 1/4 (the scale is the objective's).
    decoded = []
    monkeypatch.setattr("facevid.pipeline.decode_latents", lambda vae, latents, chunk: decoded.append(latents)
                        or decode_latents(vae, latents, chunk))
    pipe = stage.pipeline(model.eval())
    assert pipe.objective.parameterization.motion_scale == 4.0
    scaled_videos = pipe(["a person talking"], **SAMPLING)
    pipe.objective.parameterization.motion_scale = 1.0
    plain_videos = pipe(["a person talking"], **SAMPLING)
    torch.testing.assert_close(decoded[0], scale_motion(decoded[1], 0.25))
    assert not np.array_equal(scaled_videos, plain_videos)


def test_motion_std_is_applied_by_training_and_sampling_alike(tmp_path_factory, tmp_path, monkeypatch):
    """The objective and every sampling step read the UNet's output through the same preconditioning, with the
    run's motion_std and the step's own noise level."""
    stage, model, batch = task_runs.built_stage("t2v", tmp_path_factory, tmp_path, *DEMO,
                                                "plugin.options.motion_std=0.1")
    seen = []
    preconditioned = motion_preconditioned_velocity

    def spy(output, noisy, alpha_bar, motion_std):
        seen.append((torch.as_tensor(alpha_bar).flatten(), motion_std))
        return preconditioned(output, noisy, alpha_bar, motion_std)

    monkeypatch.setattr("demo.aids.motion_preconditioned_velocity", spy)
    stage.compute_loss(model, batch, torch.Generator().manual_seed(0))
    assert len(seen) == 1 and seen[0][1] == 0.1 and len(seen[0][0]) == 2  # one noise level per clip

    pipe = stage.pipeline(model.eval())
    preconditioned_videos = pipe(["a person talking"], **SAMPLING)
    sampler = build_sampler(pipe.scheduler_config, "dpm++")
    sampler.set_timesteps(SAMPLING["num_inference_steps"])
    assert [float(a) for a, _ in seen[1:]] == [float(sampler.alphas_cumprod[int(t)]) for t in sampler.timesteps]
    assert all(m == 0.1 for _, m in seen[1:])
    pipe.objective.parameterization.motion_std = None
    assert not np.array_equal(preconditioned_videos, pipe(["a person talking"], **SAMPLING))


def test_motion_scale_is_refused_for_image_to_video_sampling(tmp_path_factory):
    pipe = FaceVidPipeline.from_run(task_runs.trained_run(tmp_path_factory, "i2v", "task=i2v"))
    with pytest.raises(ValueError, match="MotionPreconditionedV: image-to-video sampling needs plain latents"):
        FaceVidPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler_config, task="i2v",
                        objective=Objective(parameterization=MotionPreconditionedV(motion_scale=2.0)))


def test_an_objective_that_transforms_latents_cannot_train_image_to_video(tmp_path_factory, tmp_path, monkeypatch):
    """The core refuses it for any plug-in, not only for the demo's validated options."""
    monkeypatch.setattr(DemoTextToVideoStage, "build_objective", lambda self: Objective(
        parameterization=MotionPreconditionedV(motion_scale=2.0), scheduler=self.noise_scheduler))
    with pytest.raises(ConfigError, match="task i2v needs plain latents.*MotionPreconditionedV"):
        task_runs.built_stage("i2v", tmp_path_factory, tmp_path, *DEMO)


# ------------------------------------------------------------------------------------------ UNet
def added_output(base: dict, extra: dict, new_prefix: str):
    """(inputs, f): f(**changes) = output of DemoUNet3D(**base, **extra) minus that of the same model without the
    `extra` heads, after checking that they add only `new_prefix` weights and start at exactly zero."""
    def build(cls, **options):
        torch.manual_seed(0)
        return cls(**TINY, **options).eval()

    plain = build(DemoUNet3D, **base) if base else build(FaceVidUNet3D)
    extended = build(DemoUNet3D, **base, **extra)
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith(new_prefix) for k in missing)
    inputs, mask = make_inputs(context_len=6), padding_mask(2, 6)
    torch.testing.assert_close(extended(**inputs, encoder_attention_mask=mask),
                               plain(**inputs, encoder_attention_mask=mask), atol=0, rtol=0)
    randomize_zero_layers(extended)
    plain.load_state_dict(extended.state_dict(), strict=False)  # the shared weights stay equal

    def added(**changes):
        args = {**inputs, "encoder_attention_mask": mask, **changes}
        return extended(**args) - plain(**args)

    return inputs, added


def test_text_layout_starts_neutral_and_adds_one_prompt_layout_to_every_frame():
    with torch.no_grad():
        inputs, layout_of = added_output({}, {"text_layout_size": 4}, "text_layout_")
        layout = layout_of()
        assert layout.abs().mean() > 1e-3
        # One coarse image per prompt, resized to the latent and shared by every frame ...
        torch.testing.assert_close(layout, layout[:, :, :1].expand_as(layout), atol=1e-6, rtol=0)
        # ... that does not look at the noisy latent, but does follow the prompt and the noise level.
        torch.testing.assert_close(layout_of(sample=torch.randn_like(inputs["sample"])), layout, atol=1e-5, rtol=0)
        other_text = torch.randn_like(inputs["encoder_hidden_states"])
        assert not torch.allclose(layout_of(encoder_hidden_states=other_text), layout, atol=1e-3)
        low_noise, high_noise = (layout_of(timestep=torch.tensor([t, t])) for t in (3, 900))
        assert not torch.allclose(low_noise, high_noise, atol=1e-3)


def test_text_motion_frames_add_a_zero_mean_per_frame_part_to_the_layout():
    with torch.no_grad():
        inputs, motion_of = added_output({"text_layout_size": 4}, {"text_motion_frames": 3}, "text_motion_head")
        motion = motion_of()  # 3 learnt frames resampled to the input's frame count
        assert motion.shape == inputs["sample"].shape and motion.abs().mean() > 1e-3
        assert not torch.allclose(motion[:, :, :1].expand_as(motion), motion, atol=1e-3)  # differs frame to frame
        torch.testing.assert_close(motion.mean(dim=2), torch.zeros_like(motion.mean(dim=2)), atol=1e-5, rtol=0)
        other_text = torch.randn_like(inputs["encoder_hidden_states"])
        assert not torch.allclose(motion_of(encoder_hidden_states=other_text), motion, atol=1e-3)
        torch.testing.assert_close(motion_of(sample=torch.randn_like(inputs["sample"])), motion, atol=1e-5, rtol=0)
        one_frame = {k: v[:, :, :1] if k == "sample" else v for k, v in inputs.items()}
        assert motion_of(**one_frame).abs().max() < 1e-5  # a single frame has no motion to add


def test_text_layout_is_added_to_still_image_batches_which_skip_the_temporal_layers():
    """Joint image + video training calls the model with temporal=False; the demo UNet passes it on (otherwise its
    trained temporal layers would act, and the difference to the plain UNet would not be the layout alone)."""
    with torch.no_grad():
        inputs, layout_of = added_output({}, {"text_layout_size": 4}, "text_layout_")
        one_frame = {**inputs, "sample": inputs["sample"][:, :, :1]}
        torch.testing.assert_close(layout_of(**one_frame, temporal=False), layout_of(**one_frame), atol=1e-5, rtol=0)


def test_demo_unet_saves_and_loads_with_its_core_arguments(tmp_path):
    torch.manual_seed(0)
    model = randomize_zero_layers(DemoUNet3D(**TINY, text_layout_size=4, text_motion_frames=3).eval())
    model.save_pretrained(tmp_path)
    loaded = DemoUNet3D.from_pretrained(tmp_path).eval()
    public = lambda config: {k: list(v) if isinstance(v, tuple) else v  # noqa: E731
                             for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)  # FaceVidUNet3D's arguments survive too
    assert loaded.config.text_motion_frames == 3 and loaded.config.block_out_channels == [16, 32]
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ VAE
def test_vae_edge_loss_counts_errors_in_the_image_gradient(tmp_path_factory, tmp_path):
    manifest = task_runs.synth_manifest(tmp_path_factory)
    clip = torch.zeros(1, 3, 2, 8, 8)  # (B, C, F, H, W), as the dataset yields
    uniform = torch.full_like(clip, 0.1)  # a colour offset: no error in the gradient
    checkerboard = 0.1 * (-1.0) ** torch.arange(8).add(torch.arange(8)[:, None])  # every neighbour 0.2 apart
    checkerboard = checkerboard.expand_as(clip)

    def loss(weight, error):
        cfg = tiny_config(manifest, tmp_path, *DEMO, f"plugin.options.vae_edge_loss_weight={weight}", stage="vae")
        stage = build_stage(cfg)
        assert type(stage) is DemoVAEStage
        stage.device = torch.device("cpu")
        flat = error.transpose(1, 2).flatten(0, 1)  # the stage's (B*F, C, H, W) frames
        fake_vae = lambda frames, generator: (frames + flat, torch.zeros(()))  # noqa: E731
        return stage.compute_loss(fake_vae, {"pixel_values": clip}, torch.Generator())

    for error in (uniform, checkerboard):
        total, logs = loss(0, error)
        assert total.item() == pytest.approx(0.01) and "edge" not in logs  # plain MSE
    total, logs = loss(2, uniform)
    assert total.item() == pytest.approx(0.01) and float(logs["edge"]) == pytest.approx(0.0)
    total, logs = loss(2, checkerboard)  # squared differences 0.04 along each axis
    assert float(logs["edge"]) == pytest.approx(0.08) and total.item() == pytest.approx(0.01 + 2 * 0.08)
