"""Pretrained backbones: FaceVidUNet3D initialised from diffusers' UNet3DConditionModel computes the same function
(and maps back losslessly), from a UNet2DConditionModel it is the image model applied per frame, and options the
mapping does not reproduce are refused by name."""

import json
import shutil

import pytest
import task_runs
import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel
from tiny import tiny_config

from bench.activations import SavedForBackward
from facevid.diffusion import check_pretrained_schedule, pretrained_schedule_mismatches
from facevid.schema import ConfigError, DiffusionConfig
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer
from models.pretrained import (
    UnsupportedBackboneError,
    facevid_config_from_unet3d,
    from_unet2d,
    from_unet3d,
    load_pretrained_unet,
    pretrained_scheduler_config,
    to_unet3d,
)
from models.unet3d import FaceVidUNet3D

TEXT_DIM = 24
# Observed: bit-identical outputs on CPU (same ops in the same order); the tolerance allows other kernels.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)

UNET3D_CONFIGS = {
    "two_levels": dict(block_out_channels=(16, 32), down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
                       up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), attention_head_dim=8),
    "three_levels_two_layers": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=16, norm_eps=1e-6,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")),
}


# Tiny models: one thread is as fast, and fair to other processes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def perturbed(model, scale: float = 0.05, only: str = ""):
    """Add noise to every weight (whose name contains `only`), so zero-initialised layers take part."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def unet3d(name: str) -> UNet3DConditionModel:
    torch.manual_seed(0)
    config = {"layers_per_block": 1, "cross_attention_dim": TEXT_DIM, "norm_num_groups": 8, **UNET3D_CONFIGS[name]}
    return perturbed(UNet3DConditionModel(**config))


def inputs(frames: int = 3, height: int = 8, width: int = 12):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, frames, height, width, generator=generator), torch.tensor([3, 800]),
            torch.randn(2, 7, TEXT_DIM, generator=generator))


@pytest.mark.parametrize("name", list(UNET3D_CONFIGS))
@pytest.mark.parametrize("frames", [1, 5])
def test_unet3d_mapping_gives_the_same_outputs(name, frames):
    reference = unet3d(name)
    model = from_unet3d(reference).eval()
    sample, timestep, text = inputs(frames)
    with torch.no_grad():
        expected = reference(sample, timestep, text).sample
        torch.testing.assert_close(model(sample, timestep, text), expected, **TOLERANCE)
        # Those models never saw a text mask; the converted one ignores it the same way.
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[:, 4:] = False
        torch.testing.assert_close(model(sample, timestep, text, mask), expected, **TOLERANCE)


def test_unet3d_round_trip_is_lossless():
    reference = unet3d("three_levels_two_layers")
    back = to_unet3d(from_unet3d(reference)).state_dict()
    original = reference.state_dict()
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value.reshape(back[key].shape)), key


def test_load_pretrained_finds_a_pipeline_folder_and_adds_image_channels(tmp_path):
    reference = unet3d("two_levels")
    reference.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    sample, timestep, text = inputs()
    t2v = load_pretrained_unet(str(tmp_path / "pipe")).eval()
    i2v = load_pretrained_unet(str(tmp_path / "pipe"), "unet3d", "unet", condition_channels=5).eval()
    assert i2v.config.condition_channels == 5 and i2v.conv_in.weight[:, 4:].eq(0).all()
    condition = torch.randn(2, 5, *sample.shape[2:])
    with torch.no_grad():
        expected = reference(sample, timestep, text).sample
        torch.testing.assert_close(t2v(sample, timestep, text), expected, **TOLERANCE)
        # The new channels start at zero: the image-to-video model starts as the text-to-video one.
        torch.testing.assert_close(i2v(sample, timestep, text, condition=condition), expected, **TOLERANCE)
    t2v.save_pretrained(tmp_path / "facevid")
    assert load_pretrained_unet(str(tmp_path / "facevid")).config.temporal_block == "transformer"


def test_unsupported_unet3d_options_are_refused_by_name():
    config = {**unet3d("two_levels").config, "mid_block_scale_factor": 2.0, "act_fn": "gelu",
              "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"]}
    with pytest.raises(UnsupportedBackboneError) as err:
        facevid_config_from_unet3d(config)
    message = str(err.value)
    assert "mid_block_scale_factor=2.0 (supported: 1)" in message and "act_fn='gelu'" in message
    assert "up_block_types" in message and "mirror of down_block_types" in message


def test_facevid_layouts_without_an_equivalent_are_not_exported_as_unet3d():
    with pytest.raises(UnsupportedBackboneError) as err:
        to_unet3d(FaceVidUNet3D(block_out_channels=(16, 32), attention_levels=(False, True), attention_head_dim=8,
                                cross_attention_dim=TEXT_DIM, norm_num_groups=8, condition_channels=5))
    for reason in ("ff_activation='gelu'", "temporal_conv=False", "cross_attention_mask=True", "condition_channels=5",
                   "temporal_attention_levels"):
        assert reason in str(err.value)


@pytest.mark.parametrize("variant", [
    dict(attention_head_dim=2),  # SD 1.x style: a head count, 1x1 conv projections
    dict(attention_head_dim=(1, 2), use_linear_projection=True),  # SD 2.x style: counts per level, linear
])
def test_unet2d_init_is_the_image_model_applied_per_frame(variant):
    torch.manual_seed(0)
    image_model = perturbed(UNet2DConditionModel(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=TEXT_DIM,
        norm_num_groups=8, **variant))
    model = from_unet2d(image_model).eval()
    sample, timestep, text = inputs(frames=4)
    with torch.no_grad():
        per_frame = torch.stack([image_model(sample[:, :, f], timestep, text).sample for f in range(4)], dim=2)
        torch.testing.assert_close(model(sample, timestep, text), per_frame, **TOLERANCE)
        perturbed(model, only="temporal")  # once the temporal layers learn something, frames interact
        assert not torch.allclose(model(sample, timestep, text), per_frame, atol=1e-3)


def test_gradient_checkpointing_covers_the_unet3d_layout():
    model = from_unet3d(unet3d("two_levels")).train()
    sample, timestep, text = inputs()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        with SavedForBackward(model) as saved:
            model(sample, timestep, text).pow(2).mean().backward()
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()}, saved.bytes))
    (plain, plain_bytes), (ckpt, ckpt_bytes) = results
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ckpt_bytes < plain_bytes / 4


# ------------------------------------------------------------------------------ run config vs pretrained UNet

MODELSCOPE_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False}


@pytest.fixture(scope="module")
def modelscope_pipeline_folder(tmp_path_factory):
    """A pipeline folder as ModelScope / zeroscope ship it: unet/ (a tiny UNet3DConditionModel), scheduler/
    (their schedule, epsilon prediction by omission) and model_index.json."""
    folder = tmp_path_factory.mktemp("modelscope")
    shutil.copytree(task_runs.tiny_unet3d(tmp_path_factory), folder / "unet")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(MODELSCOPE_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    return folder


def start_run(tmp_path_factory, tmp_path, *overrides):
    """Start a tiny t2v run (refusals happen while it builds the model, before the first step)."""
    cfg = tiny_config(task_runs.synth_manifest(tmp_path_factory), tmp_path / "run", "train.max_steps=1",
                      *overrides, vae=task_runs.random_vae(tmp_path_factory))
    Trainer(cfg, TextToVideoStage(cfg)).fit()


def test_a_pretrained_pipeline_with_another_noise_schedule_is_refused(modelscope_pipeline_folder, tmp_path_factory,
                                                                       tmp_path):
    with pytest.raises(ConfigError) as err:
        start_run(tmp_path_factory, tmp_path, f"unet.pretrained={modelscope_pipeline_folder}")
    message = str(err.value)
    for problem in ("diffusion.beta_start: run 0.0001, pretrained 0.00085", "diffusion.beta_end: run 0.02, "
                    "pretrained 0.012", "diffusion.prediction_type: run 'v_prediction', pretrained 'epsilon'"):
        assert problem in message
    assert "beta_schedule" not in message and "scheduler_config.json" in message
    # How to fix it:
    assert "diffusion.beta_start=0.00085 diffusion.beta_end=0.012 diffusion.prediction_type=epsilon" in message
    # The unet/ folder itself finds its pipeline's scheduler in the parent folder.
    found, where = pretrained_scheduler_config(str(modelscope_pipeline_folder / "unet"))
    assert found["beta_end"] == 0.012 and where.endswith("scheduler/scheduler_config.json")
    matching = DiffusionConfig(beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", min_snr_gamma=None)
    assert pretrained_schedule_mismatches(found, matching) == {}
    check_pretrained_schedule(str(modelscope_pipeline_folder), None, matching)  # no error
    # A bare UNet folder without a pipeline around it has no schedule to compare.
    assert pretrained_scheduler_config(str(task_runs.tiny_unet3d(tmp_path_factory))) is None


def test_pooled_text_conditioning_with_a_pretrained_unet_without_it_is_refused(tmp_path_factory, tmp_path):
    unet = task_runs.tiny_unet3d(tmp_path_factory)
    with pytest.raises(ConfigError, match="unet.pooled_text_conditioning' = True is invalid with unet.pretrained"):
        start_run(tmp_path_factory, tmp_path, f"unet.pretrained={unet}", "unet.pooled_text_conditioning=true")
