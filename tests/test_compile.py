"""train.compile: regional (per-block) and whole-model torch.compile, in place so weight names stay clean; a
compiled tiny run trains to the eager run's losses and resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_config, train_tiny_vae

from data import synth
from facevid.checkpoints import list_checkpoints
from facevid.compile import compile_model, repeated_blocks
from facevid.config import ConfigError, load_config, validate
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer
from models.dit import FaceVidDiT
from models.unet3d import FaceVidUNet3D


def tiny_unet():
    torch.manual_seed(0)
    return FaceVidUNet3D(in_channels=4, out_channels=4, block_out_channels=(32, 32), attention_levels=(False, True),
                         attention_head_dim=16, cross_attention_dim=64, norm_num_groups=32)


def test_blocks_are_the_repeated_layers_and_names_stay_clean():
    unet = tiny_unet()
    names = list(unet.state_dict())
    blocks = repeated_blocks(unet)
    assert blocks and {type(b).__name__ for b in blocks} == {"UNetLayer"}
    assert len(blocks) == sum(type(m).__name__ == "UNetLayer" for m in unet.modules())
    assert compile_model(unet, "blocks") == len(blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)  # really compiled (lazily, at first call)
    assert list(unet.state_dict()) == names  # in place: no `_orig_mod.` anywhere
    whole = tiny_unet()
    assert compile_model(whole, "full") == 1 and whole._compiled_call_impl is not None
    assert list(whole.state_dict()) == names
    assert compile_model(tiny_unet(), "none") == 0


def test_dit_blocks_are_found():
    dit = FaceVidDiT(in_channels=4, out_channels=4, hidden_size=32, depth=2, num_heads=2, patch_size=2,
                     cross_attention_dim=64)
    assert [type(b).__name__ for b in repeated_blocks(dit)] == ["DiTBlock", "DiTBlock"]


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no repeated block"):
        compile_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks")


@pytest.mark.parametrize("override, stage, match", [("train.compile=sometimes", "t2v", "train.compile"),
                                                    ("train.compile=blocks", "vae", "train.compile")])
def test_compile_config_is_validated(tmp_path, override, stage, match):
    cfg = load_config(None, [f"stage={stage}", f"output_dir={tmp_path}", f"data.manifest={tmp_path / 'm.jsonl'}",
                             override], validate_files=False)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow  # cold regional compile of the tiny UNet's forward and backward: ~1-2 min on 2 shared cores
def test_compiled_run_matches_eager_and_resumes(tmp_path):
    manifest = synth.generate(tmp_path / "synth", num_clips=8, num_frames=8, resolution=32, fps=8.0, seed=1,
                              progress=False)
    vae = train_tiny_vae(manifest, tmp_path / "vae_run", steps=1)
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.lr_scheduler=constant"]

    def run(name, *extra):
        cfg = tiny_config(manifest, tmp_path / name, *common, *extra, vae=vae)
        Trainer(cfg, TextToVideoStage(cfg)).fit()
        return tmp_path / name

    eager = run("eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run("compiled", "train.compile=blocks")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled path really ran
    a, b = _losses(eager), _losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), step
    for folder in ("unet", "unet_ema"):  # saved weights: the same names and nearly the same values
        x = load_file(eager / folder / "diffusion_pytorch_model.safetensors")
        y = load_file(compiled / folder / "diffusion_pytorch_model.safetensors")
        assert x.keys() == y.keys()
        # AdamW moves a weight by at most ~lr per step whatever its gradient, so rounding differences in
        # near-zero gradients can move single weights by up to 2 x lr x steps; typical ones agree far closer.
        diff = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
        assert diff.max() <= 2 * 1e-3 * 4 and diff.median() < 1e-5, (folder, diff.max(), diff.median())
    checkpoint = load_file(list_checkpoints(compiled)[-1] / "model.safetensors")
    assert not any("_orig_mod" in k for k in checkpoint)

    # Resume the compiled run from its step-2 checkpoint, compiled again: steps 3 and 4 as before.
    resumed = run("resumed", "train.compile=blocks", f"resume={list_checkpoints(compiled)[0]}")
    c = _losses(resumed)
    assert sorted(c) == [3, 4]
    for step in c:
        assert c[step] == pytest.approx(b[step], rel=1e-5, abs=1e-7), step
