"""The real recipes (configs/t2v_256.yaml, configs/t2v_512.yaml) validate, hold the objective their comments
justify, build a standard-exportable UNet, and their min-SNR weighting survives the zero-SNR step."""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import compute_snr

from facevid.config import load_config
from facevid.diffusion import build_noise_scheduler
from facevid.objective import Objective
from facevid.schema import ConfigError
from models.pretrained import layout_options, unet3d_incompatibilities

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_recipe(name: str, tmp_path: Path, *extra: str):
    """The recipe with its local paths (manifest, the 256 px run's weights) and its hub models (offline here)
    pointed at stand-in folders."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    unet_256 = tmp_path / "runs" / "t2v_256" / "unet_ema"
    unet_256.mkdir(parents=True, exist_ok=True)
    for folder in ("vae", "text_encoder"):
        (tmp_path / folder).mkdir(exist_ok=True)
    overrides = [f"data.manifest={manifest}", f"output_dir={tmp_path / name}", f"vae.pretrained={tmp_path / 'vae'}",
                 f"text_encoder.pretrained={tmp_path / 'text_encoder'}"]
    if name == "t2v_512.yaml":
        overrides.append(f"unet.pretrained={unet_256}")
    return load_config(CONFIGS / name, overrides + list(extra))


def test_the_256_and_512_recipes_validate_and_share_one_objective(tmp_path):
    small, large = load_recipe("t2v_256.yaml", tmp_path), load_recipe("t2v_512.yaml", tmp_path)
    d = small.diffusion
    assert (d.beta_schedule, d.beta_start, d.beta_end) == ("scaled_linear", 0.00085, 0.012)  # SD's schedule
    assert d.prediction_type == "v_prediction" and d.zero_terminal_snr and d.offset_noise == 0  # ZTSNR, no offset
    assert d.min_snr_gamma == 5.0
    assert small.sample.guidance_scale == 7.5 and small.sample.guidance_rescale == 0.7  # Lin et al.'s pair
    # The 512 px run continues the 256 px one: same objective, data, encoders and sampling; only size and budget.
    assert (large.diffusion, large.sample, large.text_encoder, large.vae) == (d, small.sample, small.text_encoder,
                                                                              small.vae)
    assert (large.data.resolution, large.data.num_frames, large.data.target_fps) == (512, 16, 6.25)
    assert large.train.mixed_precision == "bf16" and large.unet.gradient_checkpointing
    assert large.train.batch_size * large.train.gradient_accumulation_steps == 4  # the related setup's batch 4
    assert 4e-6 <= large.train.learning_rate <= 5e-5
    # The 256 px recipe trains a UNet with an exact UNet3DConditionModel equivalent (a standard export).
    u = small.unet
    assert u.layout == "modelscope" and not u.pooled_text_conditioning
    config = {**layout_options(u.layout, u.attention_levels, u.temporal_conv), "condition_channels": 0,
              "pooled_text_conditioning": u.pooled_text_conditioning, "attention_levels": u.attention_levels,
              "attention_head_dim": u.attention_head_dim, "block_out_channels": u.block_out_channels}
    assert unet3d_incompatibilities(config) == []


def test_min_snr_weighting_is_finite_at_the_zero_snr_step(tmp_path):
    """v-prediction's min-SNR weight min(snr, gamma) / (snr + 1) is 0 at zero-terminal SNR's last step: the loss
    and its gradients must stay finite there. The recipe's objective with 2 timesteps, the last at SNR 0."""
    cfg = dataclasses.replace(load_recipe("t2v_256.yaml", tmp_path).diffusion, num_train_timesteps=2)
    scheduler = build_noise_scheduler(cfg)
    assert compute_snr(scheduler, torch.tensor([1])).item() == 0.0
    objective = Objective.from_config(cfg, scheduler)
    weight = torch.ones((), requires_grad=True)
    seen = []

    def model(noisy, timesteps):
        seen.extend(timesteps.tolist())
        return weight * noisy

    latents = torch.randn(8, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = objective.loss(model, latents, torch.Generator().manual_seed(1))
    loss.backward()
    assert 1 in seen and 0 in seen  # the zero-SNR step and a normal one in the same batch
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(weight.grad)


def test_new_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"sample.guidance_rescale' = 1.5 is invalid: must be in \[0, 1\]"):
        load_recipe("t2v_256.yaml", tmp_path, "sample.guidance_rescale=1.5")
    with pytest.raises(ConfigError, match="unet.layout' = 'unet3d' is invalid: must be one of facevid, modelscope"):
        load_recipe("t2v_256.yaml", tmp_path, "unet.layout=unet3d")
    with pytest.raises(ConfigError, match="unet.pooled_text_conditioning' = True is invalid: UNet3DConditionModel"):
        load_recipe("t2v_256.yaml", tmp_path, "unet.pooled_text_conditioning=true")


def test_the_bucket_and_joint_image_recipes_validate(tmp_path):
    buckets = load_recipe("t2v_256_buckets.yaml", tmp_path)
    assert list(buckets.data.buckets) == ["16x256x256", "16x320x576", "24x256x256"] and buckets.data.cache == "none"
    joint = load_recipe("t2v_256_joint_images.yaml", tmp_path)
    assert joint.data.image_batch_share == 0.25 and joint.unet.layout == "modelscope"
