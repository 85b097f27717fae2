"""What is trained (facevid/trainable.py): the selection rules, and the AnimateDiff recipe end to end: a (tiny)
Stable-Diffusion-style UNet2DConditionModel inflated to video, its spatial weights frozen, its temporal layers
trained by the production Trainer; frozen weights stay bit-identical in the raw and EMA weights, exact resume
holds, and the export carries the frozen image weights unchanged."""

import json

import pytest
import task_runs
import torch
from diffusers import UNet2DConditionModel
from runs import PreemptedStage, losses
from safetensors.torch import load_file
from tiny import tiny_config

from facevid.checkpoints import list_checkpoints
from facevid.config import load_config
from facevid.ema import trainable_parameters
from facevid.schema import ConfigError
from facevid.stages import TextToVideoStage
from facevid.trainable import is_temporal, select_trainable
from facevid.trainer import Trainer
from models.pretrained import key_map, load_pretrained_unet
from models.unet3d import FaceVidUNet3D

export = task_runs.entry_point("export")


def tiny_unet() -> FaceVidUNet3D:
    torch.manual_seed(0)
    return FaceVidUNet3D(in_channels=4, out_channels=4, block_out_channels=(32, 32), attention_levels=(False, True),
                         attention_head_dim=16, cross_attention_dim=384, norm_num_groups=32, temporal_conv=True)


def select(tmp_path, *overrides):
    manifest = tmp_path / "manifest.jsonl"
    manifest.touch()
    model = tiny_unet()
    names = select_trainable(model, tiny_config(manifest, tmp_path, *overrides, vae=tmp_path))
    return model, names


def numel(model, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def test_trainable_selection_follows_the_rule(tmp_path, caplog):
    model, names = select(tmp_path)
    assert names == [n for n, _ in model.named_parameters()]  # all

    caplog.set_level("INFO", logger="facevid")
    model, names = select(tmp_path, "train.trainable=temporal")
    temporal = [n for n, _ in model.named_parameters() if ".temporal." in n or ".temporal_conv." in n]
    assert names == temporal and len(temporal) > 20
    assert [n for n, p in model.named_parameters() if p.requires_grad] == temporal
    assert sum(p.numel() for p in trainable_parameters(model)) == numel(model, temporal)
    total = sum(p.numel() for p in model.parameters())
    frozen = (total - numel(model, temporal)) / 1e6
    assert f"{numel(model, temporal) / 1e6:.2f}M of {total / 1e6:.2f}M" in caplog.text
    assert f"frozen {frozen:.2f}M" in caplog.text

    # include adds to the mode, exclude removes (and wins)
    model, names = select(tmp_path, "train.trainable=temporal", "train.trainable_include=[conv_in.*]",
                          "train.trainable_exclude=['*.temporal_conv.*']")
    assert names == ["conv_in.weight", "conv_in.bias"] + [n for n in temporal if ".temporal_conv." not in n]
    model, names = select(tmp_path, "train.trainable=patterns", "train.trainable_include=['conv_*', 'norm_out.*']")
    assert names == ["conv_in.weight", "conv_in.bias", "norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias"]
    model, names = select(tmp_path, "train.trainable_exclude=['*.spatial.*']")
    assert names and not any(".spatial." in n for n in names) and len(names) < len(list(model.parameters()))

    # Image-to-video adds its condition channels to conv_in at zero: frozen, they would never learn.
    assert "conv_in frozen" not in caplog.text
    select(tmp_path, "task=i2v", "train.trainable=temporal", "train.trainable_include=[conv_in.*]")
    assert "conv_in frozen" not in caplog.text
    select(tmp_path, "task=i2v", "train.trainable=temporal")
    assert "task i2v with conv_in frozen" in caplog.text


def test_trainable_config_errors_name_the_pattern(tmp_path):
    with pytest.raises(ConfigError, match=r"train.trainable_include.*'\*\.temporl\.\*' matches no parameter"):
        select(tmp_path, "train.trainable=patterns", "train.trainable_include=['*.temporl.*']")
    with pytest.raises(ConfigError, match=r"train.trainable_exclude.*'nothing' matches no parameter"):
        select(tmp_path, "train.trainable_exclude=[nothing]")
    with pytest.raises(ConfigError, match="leaves no parameter to train"):
        select(tmp_path, "train.trainable=temporal", "train.trainable_exclude=['*']")
    with pytest.raises(ConfigError, match="train.trainable_include.*give at least one pattern"):
        select(tmp_path, "train.trainable=patterns")
    with pytest.raises(ConfigError, match="'train.trainable' = 'everything' is invalid: must be one of all, temporal"):
        select(tmp_path, "train.trainable=everything")


def load_recipe(config: str, tmp_path):
    """A shipped recipe with local stand-ins for its hub models (offline tests cannot reach the hub)."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.touch()
    for folder in ("unet", "vae"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return load_config(config, [f"data.manifest={manifest}", f"unet.pretrained={tmp_path / 'unet'}",
                                f"vae.pretrained={tmp_path / 'vae'}", "text_encoder.pretrained=bundled:all-MiniLM-L6-v2",
                                "text_encoder.subfolder=null"])


def test_animatediff_config_is_the_inflated_image_unet_with_temporal_training(tmp_path):
    cfg = load_recipe("configs/animatediff_256.yaml", tmp_path)
    assert (cfg.unet.pretrained_format, cfg.train.trainable) == ("unet2d", "temporal")
    assert (cfg.unet.subfolder, cfg.diffusion.prediction_type) == ("unet", "epsilon")  # SD 1.5's unet/, objective


@pytest.fixture(scope="module")
def image_unet(tmp_path_factory):
    """A tiny Stable-Diffusion-style UNet2DConditionModel (all weights perturbed), standing in for SD's unet/."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, cross_attention_dim=384,
        attention_head_dim=2, norm_num_groups=32, sample_size=8)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.02 * torch.randn_like(param))
    out = tmp_path_factory.mktemp("sd_unet")
    unet.save_pretrained(out)
    return out


def test_animatediff_recipe_trains_only_temporal_layers_and_resumes_exactly(image_unet, tmp_path_factory, tmp_path):
    manifest, vae = task_runs.synth_manifest(tmp_path_factory), task_runs.random_vae(tmp_path_factory)
    common = ["train.max_steps=4", "train.trainable=temporal", f"unet.pretrained={image_unet}",
              "unet.pretrained_format=unet2d", "sample.num_inference_steps=2", "train.validate_every=0"]
    straight = tiny_config(manifest, tmp_path / "straight", *common, vae=vae)
    Trainer(straight, TextToVideoStage(straight)).fit()
    first = tiny_config(manifest, tmp_path / "resumed", *common, vae=vae)
    Trainer(first, PreemptedStage(first, at=2)).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000002"]
    second = tiny_config(manifest, tmp_path / "resumed", *common, "resume=latest", vae=vae)
    Trainer(second, TextToVideoStage(second)).fit()

    assert sorted(losses(tmp_path / "straight")) == [1, 2, 3, 4]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    initial = load_pretrained_unet(str(image_unet), "unet2d").state_dict()
    weights = "diffusion_pytorch_model.safetensors"
    for folder in ("unet", "unet_ema"):
        trained = load_file(tmp_path / "straight" / folder / weights)
        resumed = load_file(tmp_path / "resumed" / folder / weights)
        assert trained.keys() == resumed.keys() == initial.keys()
        assert all(torch.equal(trained[k], resumed[k]) for k in trained), folder
        frozen = [k for k in initial if not is_temporal(k)]
        assert len(frozen) > 50 and all(torch.equal(trained[k], initial[k]) for k in frozen), folder
        changed = [k for k in initial if is_temporal(k) and not torch.equal(trained[k], initial[k])]
        assert changed == [k for k in initial if is_temporal(k)], folder
    # The optimizer holds only the temporal parameters.
    optimizer = torch.load(list_checkpoints(tmp_path / "straight")[-1] / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == len([k for k in initial if is_temporal(k)])

    # Export: the standard UNet3DConditionModel carries the image UNet's weights unchanged.
    out = tmp_path / "export"
    assert export.main(["--run", str(tmp_path / "straight"), "--out", str(out)]) == 0
    assert json.loads((out / "model_index.json").read_text())["unet"][1] == "UNet3DConditionModel"
    exported = load_file(out / "unet" / weights)
    image = load_file(image_unet / weights)
    model = load_pretrained_unet(str(image_unet), "unet2d")
    to_3d, to_2d = key_map(model, temporal=True), key_map(model, temporal=False)
    for key in frozen:
        assert torch.equal(exported[to_3d[key]].flatten(), image[to_2d[key]].flatten()), key
