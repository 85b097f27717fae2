"""FaceVidDiT (models/dit.py, unet.backbone=dit): shapes, attention backends, gradient checkpointing, learning on a
fixed batch, and tiny real runs through the production Trainer for every task (exact resume, save/load, sampling
via FaceVidPipeline.from_run and sample.py, the FaceVid-format export loaded in a fresh process)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import task_runs
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from runs import assert_same_weights, fixed_batch_losses, losses, train_straight_and_resumed
from safetensors.torch import load_file
from test_engines import FSDP2_ENV, _join_group, run_two_ranks
from test_export import run_fresh_interpreter
from tiny import tiny_config

from facevid.config import load_config
from facevid.pipeline import FaceVidPipeline, load_first_frame
from facevid.schema import ConfigError
from facevid.stages import TextToVideoStage
from facevid.stages.text_to_video import BACKBONES, build_dit
from facevid.tasks import condition_channels
from models.backbones import load_backbone
from models.dit import DiTBlock, FaceVidDiT, sincos_3d

# A tiny DiT for the tiny runs (tests/tiny.py: 8x8 latents -> 4x4 patches a frame).
DIT = ["unet.backbone=dit", "unet.dit.hidden_size=32", "unet.dit.depth=2", "unet.dit.num_heads=2"]
SAMPLING = dict(num_frames=4, resolution=16, num_inference_steps=2, guidance_scale=2.0)

sample = task_runs.entry_point("sample")
export = task_runs.entry_point("export")


# Tiny models: one thread is as fast, and fair to other processes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_dit(**overrides) -> FaceVidDiT:
    """A tiny DiT whose zero-initialised layers are perturbed, so every path contributes to the output."""
    torch.manual_seed(0)
    options = dict(in_channels=4, cross_attention_dim=24, hidden_size=32, depth=2, num_heads=2) | overrides
    model = FaceVidDiT(**options)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def inputs(batch=2, frames=5, height=6, width=10, condition_channels=0):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, frames, height, width, generator=generator)
    text = torch.randn(batch, 7, 24, generator=generator)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[0, 3:] = False  # padding tokens in the first prompt
    condition = (torch.randn(batch, condition_channels, frames, height, width, generator=generator)
                 if condition_channels else None)
    return sample, torch.tensor([3, 700]), text, mask, condition


@pytest.mark.parametrize("attention, temporal_patch", [("alternating", 1), ("alternating", 2), ("full", 2)])
@pytest.mark.parametrize("frames", [1, 5])
def test_shapes_for_odd_frame_counts_and_non_square_latents(attention, temporal_patch, frames):
    model = FaceVidDiT(in_channels=4, condition_channels=4, cross_attention_dim=24, hidden_size=32, depth=3,
                       num_heads=2, attention=attention, temporal_patch_size=temporal_patch)
    sample, t, text, mask, condition = inputs(frames=frames, condition_channels=4)
    out = model(sample, t, text, mask, condition=condition)
    assert out.shape == sample.shape
    # Zero-initialised gates, cross-attention output and final projection: a fresh model predicts exactly 0.
    assert torch.count_nonzero(out) == 0
    assert [b.mode for b in model.blocks] == (["spatial", "temporal", "spatial"] if attention == "alternating"
                                              else ["full"] * 3)
    perturbed = tiny_dit(condition_channels=4, attention=attention, temporal_patch_size=temporal_patch)
    out = perturbed(sample, t, text, mask, condition=condition)
    assert out.shape == sample.shape and torch.isfinite(out).all() and out.abs().mean() > 0


def test_inputs_are_checked():
    model = tiny_dit()
    sample, t, text, mask, _ = inputs(height=5)  # 5 rows do not split into 2x2 patches
    with pytest.raises(ValueError, match="divisible by 2"):
        model(sample, t, text, mask)
    sample, t, text, mask, _ = inputs()
    with pytest.raises(ValueError, match="condition was given"):
        model(sample, t, text, mask, condition=sample)


def test_positions_tell_every_token_apart():
    table = sincos_3d(3, 4, 5, 32)
    assert table.shape == (60, 32)
    assert torch.cdist(table, table).add(torch.eye(60)).min() > 0.1  # no two (frame, row, column) alike


def test_frames_interact_only_through_temporal_attention():
    """Perturbing frame 0 changes the other frames' outputs in the default (alternating) model; a model of only
    spatial blocks keeps frames independent, so the temporal blocks are what connects them."""
    sample, t, text, mask, _ = inputs()
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    for depth, connected in ((2, True), (1, False)):  # depth 1 = one spatial block
        model = tiny_dit(depth=depth)
        delta = (model(changed, t, text, mask) - model(sample, t, text, mask))[:, :, 1:].abs().max()
        assert (delta > 1e-6) == connected, depth


def test_attention_backends_agree():
    model = tiny_dit(attention="full")
    args = inputs()
    model.set_attention_backend("math")
    reference = model(*args[:4])
    model.set_attention_backend("sdpa")
    assert torch.allclose(model(*args[:4]), reference, atol=1e-5)
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"sdpa"}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_dit()
    args = inputs()

    def gradients():
        model.zero_grad()
        model(*args[:4]).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    recomputed = []
    assert all(isinstance(b, DiTBlock) for b in model.blocks)  # the checkpointing (and FSDP) unit
    handles = [b.register_forward_pre_hook(lambda *_: recomputed.append(1)) for b in model.blocks]
    checkpointed = gradients()
    for handle in handles:
        handle.remove()
    assert len(recomputed) == 2 * len(model.blocks)  # every block ran again in backward: checkpointing is on
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    history = fixed_batch_losses(FaceVidDiT(in_channels=4, cross_attention_dim=384, hidden_size=64, depth=2,
                                            num_heads=4))
    assert history[-1] < 0.5 * history[0]


def test_save_load_round_trip_reloads_the_same_class_and_function(tmp_path):
    model = tiny_dit(condition_channels=4, temporal_patch_size=2, pooled_text_conditioning=True)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "FaceVidDiT"
    loaded = load_backbone(tmp_path)
    assert type(loaded) is FaceVidDiT and loaded.config.temporal_patch_size == 2
    assert loaded.spatial_factor == 2
    args = inputs(condition_channels=4)
    assert torch.equal(loaded(*args[:4], condition=args[4]), model(*args[:4], condition=args[4]))


@pytest.mark.parametrize("override, key", [
    ("unet.text_layout=true", "unet.text_layout"),
    ("unet.layout=modelscope", "unet.layout"),
    ("unet.dit.num_heads=5", "unet.dit.hidden_size"),
    ("unet.dit.attention=spiral", "unet.dit.attention"),
    ("unet.dit.patch_size=3", "data.resolution"),  # 16 px / VAE factor 2 = 8 latent rows: not 3-patches
])
def test_config_refuses_what_the_dit_cannot_do(tmp_path_factory, tmp_path, override, key):
    vae = task_runs.random_vae(tmp_path_factory)
    manifest = task_runs.synth_manifest(tmp_path_factory)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(manifest, tmp_path, *DIT, override, vae=vae)


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    return task_runs.trained_run(tmp_path_factory, "dit_t2v", *DIT, "unet.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def dit_i2v_run(tmp_path_factory):
    return task_runs.trained_run(tmp_path_factory, "dit_i2v", *DIT, "task=i2v", "unet.dit.temporal_patch_size=2")


def test_trainer_trains_the_dit_and_from_run_samples_it(dit_run, tmp_path):
    assert {"unet", "unet_ema", "scheduler"} <= {p.name for p in dit_run.iterdir()}
    config = json.loads((dit_run / "unet" / "config.json").read_text())
    assert config["_class_name"] == "FaceVidDiT" and config["hidden_size"] == 32
    # Two AdamW steps moved the weights away from the zero initialisation of the output projection.
    assert load_file(dit_run / "unet" / "diffusion_pytorch_model.safetensors")["proj_out.weight"].abs().sum() > 0
    assert np.isfinite(losses(dit_run)[2])
    pipe = FaceVidPipeline.from_run(dit_run)
    assert type(pipe.unet) is FaceVidDiT and pipe.weights == "unet_ema"
    videos = pipe(["a person talking"], seed=3, **SAMPLING)
    assert videos.shape == (1, 4, 16, 16, 3) and videos.dtype == np.uint8
    assert np.array_equal(videos, pipe(["a person talking"], seed=3, **SAMPLING))
    assert sample.main(["--run", str(dit_run), "--prompt", "a person talking", "--steps", "2", "--frames", "3",
                        "--out", str(tmp_path)]) == 0  # 3 frames: an odd count the run never trained on
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def first_frame(tmp_path_factory) -> torch.Tensor:
    clip = task_runs.synth_manifest(tmp_path_factory).parent / "clips" / "synth_00001.mp4"
    return load_first_frame(clip, 16, frame=4)


def test_image_to_video_dit_run_samples_and_exports(dit_i2v_run, tmp_path_factory, tmp_path, monkeypatch):
    """i2v with temporal patches of 2 frames; the FaceVid-format export loads with DiffusionPipeline and makes
    sample.py's frames."""
    pipe = FaceVidPipeline.from_run(dit_i2v_run)
    assert pipe.task == "i2v" and pipe.unet.config.condition_channels == condition_channels("i2v", 4)
    image = first_frame(tmp_path_factory)
    ours = pipe(["a person talking"], images=image[None], seed=0, **SAMPLING)
    assert ours.shape == (1, 4, 16, 16, 3)

    assert export.main(["--run", str(dit_i2v_run), "--out", str(tmp_path / "i2v")]) == 0
    assert json.loads((tmp_path / "i2v" / "model_index.json").read_text())["unet"][1] == "FaceVidDiT"
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    exported = DiffusionPipeline.from_pretrained(tmp_path / "i2v", trust_remote_code=True)
    assert type(exported.unet) is FaceVidDiT
    theirs = exported("a person talking", image=image, num_inference_steps=2, guidance_scale=2.0, seed=0).frames
    assert np.array_equal(theirs, ours)


@pytest.mark.slow
def test_dit_export_loads_in_a_fresh_process(dit_i2v_run, tmp_path_factory, tmp_path, monkeypatch):
    assert export.main(["--run", str(dit_i2v_run), "--out", str(tmp_path / "i2v")]) == 0
    torch.save(first_frame(tmp_path_factory), tmp_path / "image.pt")
    # The fresh process runs outside the repository: make it import this checkout, not another installed copy.
    monkeypatch.setenv("PYTHONPATH", str(task_runs.REPO))
    result = run_fresh_interpreter(
        "import sys, torch\nfrom diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1] + '/i2v', trust_remote_code=True)\n"
        "frames = pipe('a person talking', image=torch.load(sys.argv[1] + '/image.pt'), num_inference_steps=2, "
        "guidance_scale=2.0, seed=0).frames\nprint(type(pipe.unet).__name__, frames.shape)\n", tmp_path)
    assert "FaceVidDiT (1, 4, 16, 16, 3)" in result.stdout


def test_uncond_dit_run_samples_without_a_prompt(tmp_path_factory):
    run = task_runs.trained_run(tmp_path_factory, "dit_uncond", *DIT, "task=uncond", "unet.dit.attention=full")
    pipe = FaceVidPipeline.from_run(run)
    assert pipe.task == "uncond" and type(pipe.unet) is FaceVidDiT and pipe.unet.config.attention == "full"
    videos = pipe(num_videos=2, seed=3, **SAMPLING)
    assert videos.shape == (2, 4, 16, 16, 3) and videos.dtype == np.uint8
    assert not np.array_equal(videos[0], videos[1])  # one noise per video
    assert np.array_equal(pipe(num_videos=1, seed=3, **SAMPLING)[0], videos[0])


def test_exact_resume_of_a_dit_run(tmp_path_factory, tmp_path):
    """3 steps, SIGTERM, resume, 3 more == 6 uninterrupted: same losses, bit-identical weights and EMA."""
    manifest, vae = task_runs.synth_manifest(tmp_path_factory), task_runs.random_vae(tmp_path_factory)
    common = [*DIT, "train.max_steps=6", "data.num_workers=0"]
    straight, resumed = train_straight_and_resumed(
        lambda run, *extra: tiny_config(manifest, run, *common, *extra, vae=vae), tmp_path, stop_at_step=3)
    assert losses(straight) == losses(resumed)
    assert_same_weights(straight, resumed)


def _fsdp2_dit_rank(rank: int, port: int, wrap: str | None) -> None:
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from facevid.engine import build_engine

    env = {k: v for k, v in FSDP2_ENV.items() if k != "FSDP_TRANSFORMER_CLS_TO_WRAP"}
    if wrap is None:
        os.environ.pop("FSDP_TRANSFORMER_CLS_TO_WRAP", None)
    else:
        env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = wrap
    acc = _join_group(rank, port, env)
    engine = build_engine(acc)
    assert engine.name == "fsdp2" and acc.distributed_type == DistributedType.FSDP
    model = tiny_dit(depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert sum(isinstance(m, DiTBlock) for m in units) == 3 and units[0] is model  # every block + the root
    assert all(isinstance(p, DTensor) for p in model.parameters())
    sample, t, text, mask, _ = inputs()
    acc.backward(model(sample, t, text, mask).pow(2).mean())
    optimizer.step()
    plain, _ = engine.consolidated(model, None)
    if rank == 0:
        assert type(plain) is FaceVidDiT and plain(sample, t, text, mask).shape == sample.shape
    acc.end_training()


@pytest.mark.parametrize("wrap", ["DiTBlock", None])  # named by the launch config, or found by _no_split_modules
def test_fsdp2_shards_the_dit_one_unit_per_block(wrap):
    run_two_ranks(_fsdp2_dit_rank, wrap)


def test_fsdp2_launch_naming_the_unet_block_tells_the_dit_block():
    from facevid.engine import FSDP2Engine

    plugin = SimpleNamespace(transformer_cls_names_to_wrap="UNetLayer")  # configs/accelerate/fsdp2.yaml's
    with pytest.raises(RuntimeError, match="--fsdp_transformer_layer_cls_to_wrap DiTBlock"):
        FSDP2Engine._check_wrap_units(tiny_dit(), plugin)


def test_the_dit_recipes_validate_and_have_their_stated_sizes(tmp_path, monkeypatch):
    from test_recipes import CONFIGS, load_recipe

    # Every check but the hub cache's (this machine has none of the recipe's hub models: an environment matter).
    monkeypatch.setattr("facevid.validation.check_hub_models", lambda cfg: None)
    big = load_recipe("dit_256.yaml", tmp_path)
    assert big.unet.backbone == "dit" and (big.data.resolution, big.data.num_frames) == (256, 16)
    with torch.device("meta"):  # no memory for 664M parameters
        model = BACKBONES[big.unet.backbone](big.unet, 4, 0, 768)  # SD VAE latents, CLIP ViT-L/14 text
    assert type(model) is FaceVidDiT and 600e6 < sum(p.numel() for p in model.parameters()) < 700e6
    demo = load_config(CONFIGS / "demo_dit.yaml", validate_files=False)
    assert demo.unet.backbone == "dit" and demo.unet.pooled_text_conditioning
    assert 5e6 < sum(p.numel() for p in build_dit(demo.unet, 4, 0, 384).parameters()) < 6.5e6


def test_a_dit_run_continues_from_a_trained_dit_and_refuses_a_unet(dit_run, tmp_path_factory, tmp_path):
    manifest, vae = task_runs.synth_manifest(tmp_path_factory), task_runs.random_vae(tmp_path_factory)
    cfg = tiny_config(manifest, tmp_path / "continued", *DIT, f"unet.pretrained={dit_run / 'unet_ema'}",
                      "train.max_steps=1", vae=vae)
    model = TextToVideoStage(cfg).build(Accelerator(cpu=True), SimpleNamespace(cache=None, records=[], text_key=str))
    trained = load_file(dit_run / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())  # starts from those weights
    unet_run = task_runs.trained_run(tmp_path_factory, "t2v")
    cfg = tiny_config(manifest, tmp_path / "wrong", *DIT, f"unet.pretrained={unet_run / 'unet'}", vae=vae)
    with pytest.raises(ConfigError, match="holds a FaceVidUNet3D"):
        TextToVideoStage(cfg).build(Accelerator(cpu=True), SimpleNamespace(cache=None, records=[], text_key=str))


def test_lora_trains_on_the_dit_and_merges_for_sampling(tmp_path_factory):
    run = task_runs.trained_run(tmp_path_factory, "dit_lora", *DIT, "train.trainable=lora")
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = FaceVidPipeline.from_run(run)
    assert type(pipe.unet) is FaceVidDiT and "lora" in pipe.weights
    assert pipe(["a person talking"], **SAMPLING).shape == (1, 4, 16, 16, 3)
