"""AnimateDiff motion modules as FaceVidUNet3D temporal layers: the same outputs as diffusers' UNetMotionModel
(tiny random models in the real formats), the original checkpoint keys round-trip, and files that are not plain
tensors, or modules this mapping cannot reproduce, are refused by name."""

import os
from pathlib import Path

import pytest
import task_runs
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import save_file
from torch import nn

from facevid.config import load_config
from facevid.schema import ConfigError
from models.animatediff import (
    diffusers_to_original,
    from_unet2d_and_motion,
    load_motion_module,
    motion_key_map,
    motion_module_from_state,
    original_to_diffusers,
    to_motion_adapter,
)
from models.pretrained import UnsupportedBackboneError, from_unet2d, key_map, load_pretrained_unet
from models.unet3d import FaceVidUNet3D

TEXT_DIM = 24
FRAMES = 5
# Observed: bit-identical on CPU fp32 (the same ops in the same order); the tolerance allows other kernels.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
UNET2D = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_DIM,
              attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


# Tiny models: one thread is as fast, and fair to other processes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def perturbed(*models):
    """Noise on every weight, so the zero-initialised output projections take part."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return models


def tiny(mid_block: bool = True, **adapter_options):
    """(UNet2DConditionModel, MotionAdapter): v2 / v3 layout with a mid-block module, v1 without."""
    torch.manual_seed(0)
    options = dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=8,
                   use_motion_mid_block=mid_block)
    options.update(adapter_options)
    return perturbed(UNet2DConditionModel(**UNET2D), MotionAdapter(**options))


def inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, FRAMES, 8, 8, generator=generator), torch.tensor([3, 800]),
            torch.randn(2, 7, TEXT_DIM, generator=generator))


def reference_output(unet, adapter, per_frame_norm: bool = False) -> torch.Tensor:
    reference = UNetMotionModel.from_unet2d(unet, adapter).eval()
    if per_frame_norm:
        for module in reference.modules():
            if isinstance(module, AnimateDiffTransformer3D):
                module.norm = PerFrameGroupNorm(module.norm)
    sample, timestep, text = inputs()
    with torch.no_grad():
        # The AnimateDiff pipeline repeats the prompt states for every frame before calling the UNet.
        return reference(sample, timestep, text.repeat_interleave(FRAMES, dim=0)).sample


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs())


class PerFrameGroupNorm(nn.Module):
    """The original AnimateDiff normalisation (each frame on its own), put into diffusers' motion module, whose
    own GroupNorm receives the whole (B, C, F, H, W) video."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.inner = norm

    def forward(self, video):
        frames = video.shape[2]
        flat = self.inner(video.transpose(1, 2).flatten(0, 1))
        return flat.unflatten(0, (-1, frames)).transpose(1, 2)


@pytest.mark.parametrize("mid_block", [True, False], ids=["v2_mid_block", "v1_no_mid_block"])
def test_same_outputs_as_diffusers_unet_motion_model(mid_block):
    unet, adapter = tiny(mid_block)
    expected = reference_output(unet, adapter)
    motion = motion_module_from_state(adapter.state_dict(), "adapter")
    assert motion.has_mid_block == mid_block
    model = from_unet2d_and_motion(unet, motion, temporal_norm="video")
    torch.testing.assert_close(output(model), expected, **TOLERANCE)
    # The motion modules matter: the image UNet applied per frame gives something else.
    assert (output(from_unet2d(unet)) - expected).abs().max() > 1e-2


def test_frame_norm_is_the_original_animatediff_normalisation():
    unet, adapter = tiny()
    motion = motion_module_from_state(adapter.state_dict(), "adapter")
    frame_norm = output(from_unet2d_and_motion(unet, motion))  # the default
    torch.testing.assert_close(frame_norm, reference_output(unet, adapter, per_frame_norm=True), **TOLERANCE)
    assert (frame_norm - reference_output(unet, adapter)).abs().max() > 1e-3  # diffusers pools: not the same


def test_original_checkpoint_keys_round_trip(tmp_path):
    unet, adapter = tiny()
    state = adapter.state_dict()
    original = diffusers_to_original(state, max_frames=24)
    prefix = "down_blocks.1.motion_modules.0.temporal_transformer."
    block = prefix + "transformer_blocks.0."
    for key in ("norm.weight", "proj_in.weight", "proj_out.bias"):
        assert prefix + key in original
    for key in ("attention_blocks.0.to_q.weight", "attention_blocks.1.to_out.0.bias", "norms.0.weight",
                "norms.1.bias", "ff.net.0.proj.weight", "ff.net.2.weight", "ff_norm.weight"):
        assert block + key in original, key
    assert original[block + "attention_blocks.1.pos_encoder.pe"].shape == (1, 24, 32)
    assert "mid_block.motion_modules.0.temporal_transformer.proj_out.weight" in original
    back = original_to_diffusers(original)
    assert {k for k in back if not k.endswith(".pe")} == {k for k in state if not k.endswith(".pe")}
    assert all(torch.equal(back[k], state[k]) for k in state if not k.endswith(".pe"))

    adapter.save_pretrained(tmp_path / "adapter")
    torch.save({"state_dict": original}, tmp_path / "mm_sd_v15_v2.ckpt")
    save_file(original, tmp_path / "mm.safetensors")
    expected = output(from_unet2d_and_motion(unet, load_motion_module(tmp_path / "adapter")))
    for name in ("mm_sd_v15_v2.ckpt", "mm.safetensors"):
        motion = load_motion_module(tmp_path / name)
        assert motion.max_frames == 24
        torch.testing.assert_close(output(from_unet2d_and_motion(unet, motion)), expected, **TOLERANCE)


def test_load_pretrained_unet_with_motion_module(tmp_path):
    unet, adapter = tiny()
    unet.save_pretrained(tmp_path / "sd" / "unet")
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    adapter.save_pretrained(tmp_path / "adapter")
    model = load_pretrained_unet(str(tmp_path / "sd"), motion_module=str(tmp_path / "adapter"),
                                 motion_module_norm="video")
    torch.testing.assert_close(output(model), reference_output(unet, adapter), **TOLERANCE)
    assert model.config.temporal_block == "animatediff"
    # A ModelScope-style 3D UNet already has temporal layers: refused rather than silently mixed.
    model.save_pretrained(tmp_path / "facevid")
    with pytest.raises(UnsupportedBackboneError, match="image UNet"):
        load_pretrained_unet(str(tmp_path / "facevid"), motion_module=str(tmp_path / "adapter"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"down_blocks.0.motion_modules.0.x": _RunsCode(str(marker))}}, path)
    with pytest.raises(UnsupportedBackboneError, match="evil.ckpt.*refused"):
        load_motion_module(path)
    assert not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": [1.0, 2.0]}, path)
    with pytest.raises(UnsupportedBackboneError, match="odd.ckpt: not a plain tensor state dict.*list"):
        load_motion_module(path)


def test_altered_position_table_is_refused(tmp_path):
    _, adapter = tiny()
    original = diffusers_to_original(adapter.state_dict())
    key = "up_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    original[key] = original[key] + 0.1
    save_file(original, tmp_path / "learned_pe.safetensors")
    with pytest.raises(UnsupportedBackboneError, match="attention_blocks.1.pos_encoder.pe is not AnimateDiff"):
        load_motion_module(tmp_path / "learned_pe.safetensors")


def test_mismatched_or_unsupported_modules_are_refused(tmp_path):
    unet, _ = tiny()
    _, two_layers = tiny(motion_layers_per_block=2)
    with pytest.raises(UnsupportedBackboneError, match="layers_per_block must match.*unplaced keys"):
        from_unet2d_and_motion(unet, motion_module_from_state(two_layers.state_dict(), "two_layers"))
    _, four_heads = tiny(motion_num_attention_heads=4)
    four_heads.save_pretrained(tmp_path / "four_heads")
    with pytest.raises(UnsupportedBackboneError, match="motion_num_attention_heads=4"):
        load_motion_module(tmp_path / "four_heads")
    with pytest.raises(UnsupportedBackboneError, match="not found"):
        load_motion_module(tmp_path / "missing.ckpt")
    whole_unet = {**diffusers_to_original(two_layers.state_dict()), **unet.state_dict()}
    with pytest.raises(UnsupportedBackboneError, match="'conv_in.weight' is not a motion-module weight.*whole-UNet"):
        motion_module_from_state(whole_unet, "full.ckpt")


def test_training_run_starts_from_sd_unet_and_original_motion_checkpoint(tmp_path_factory, tmp_path):
    """unet.pretrained (an image UNet) + unet.motion_module (an original-format .ckpt) + train.trainable=temporal
    through the production Trainer: the run trains only the motion modules and saves a FaceVidUNet3D that keeps
    the AnimateDiff layout."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET2D, "block_out_channels": (32, 32), "norm_num_groups": 32,
                                   "cross_attention_dim": 384})  # the bundled text encoder's width
    adapter = MotionAdapter(block_out_channels=(32, 32), motion_layers_per_block=1)
    perturbed(unet, adapter)
    unet.save_pretrained(tmp_path / "sd_unet")
    torch.save(diffusers_to_original(adapter.state_dict(), max_frames=24), tmp_path / "mm_sd_v15.ckpt")
    run = task_runs.trained_run(tmp_path_factory, "t2v_animatediff", f"unet.pretrained={tmp_path / 'sd_unet'}",
                                f"unet.motion_module={tmp_path / 'mm_sd_v15.ckpt'}", "train.trainable=temporal")
    trained = FaceVidUNet3D.from_pretrained(run / "unet")
    assert trained.config.temporal_block == "animatediff" and trained.config.temporal_norm == "frame"
    state = trained.state_dict()
    mapping = motion_key_map(trained)
    start = adapter.state_dict()
    assert all(state[ours].shape == start[theirs].shape for ours, theirs in mapping.items())
    changed = [ours for ours, theirs in mapping.items() if not torch.equal(state[ours], start[theirs])]
    assert len(changed) > len(mapping) // 2  # two steps of AdamW move the motion weights
    # train.trainable=temporal (AnimateDiff's recipe): the image UNet's weights stay exactly as loaded.
    image = unet.state_dict()
    spatial = key_map(trained, temporal=False)
    assert spatial and all(torch.equal(state[ours].reshape(image[theirs].shape), image[theirs])
                           for ours, theirs in spatial.items())


def test_shipped_config_validates_its_motion_module(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "animatediff_motion_256.yaml"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    for folder in ("sd", "vae"):
        (tmp_path / folder).mkdir()
    # Local stand-ins for the recipe's hub models (offline tests cannot reach the hub).
    local = [f"data.manifest={manifest}", f"unet.pretrained={tmp_path / 'sd'}", f"vae.pretrained={tmp_path / 'vae'}",
             "text_encoder.pretrained=bundled:all-MiniLM-L6-v2", "text_encoder.subfolder=null"]
    with pytest.raises(ConfigError, match="unet.motion_module.*mm_sd_v15_v2.ckpt.*not found"):
        load_config(config, local)
    (tmp_path / "mm.ckpt").write_bytes(b"")
    local.append(f"unet.motion_module={tmp_path / 'mm.ckpt'}")
    cfg = load_config(config, local)
    assert (cfg.unet.pretrained_format, cfg.unet.subfolder, cfg.unet.motion_module_norm) == ("unet2d", "unet", "frame")
    assert cfg.train.trainable == "temporal"  # AnimateDiff's recipe: only the motion modules train
    with pytest.raises(ConfigError, match="unet.motion_module.*needs unet.pretrained"):
        load_config(config, [*local, "unet.pretrained=null"])
    with pytest.raises(ConfigError, match="unet.motion_module_norm"):
        load_config(config, [*local, "unet.motion_module_norm=pooled"])


def test_fine_tuned_motion_modules_export_to_diffusers_and_original_keys(tmp_path):
    unet, adapter = tiny()
    model = from_unet2d_and_motion(unet, motion_module_from_state(adapter.state_dict(), "adapter"),
                                   temporal_norm="video")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # stands in for fine-tuning: new motion weights, image weights unchanged
        for name, param in model.named_parameters():
            if ".temporal." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    exported = to_motion_adapter(model)
    torch.testing.assert_close(reference_output(unet, exported), output(model), **TOLERANCE)
    torch.save(diffusers_to_original(exported.state_dict(), max_frames=32), tmp_path / "mm_faces.ckpt")
    again = from_unet2d_and_motion(unet, load_motion_module(tmp_path / "mm_faces.ckpt"), temporal_norm="video")
    torch.testing.assert_close(output(again), output(model), **TOLERANCE)
    with pytest.raises(UnsupportedBackboneError, match="temporal_block='attention'"):
        to_motion_adapter(FaceVidUNet3D(block_out_channels=(32, 32), attention_levels=(False, True)))
