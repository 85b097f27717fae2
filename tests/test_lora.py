"""LoRA training (train.trainable=lora, models/lora.py): adapters on a (tiny) ModelScope-format UNet3DConditionModel,
trained by the production Trainer. Only the adapters train and are saved (diffusers' PEFT format); the base weights
stay bit-identical; exact resume holds; the saved file loads back to the trained model; export.py writes the base
pipeline + the adapter (loaded with PEFT in a fresh process) or, with --merge-lora, merged weights; both sample the
frames sample.py samples from the run."""

import json
from pathlib import Path

import numpy as np
import pytest
import task_runs
import torch
from diffusers import UNet3DConditionModel
from runs import PreemptedStage, launch_demo, losses
from safetensors.torch import load_file
from test_export import GUIDANCE, SEED, STEPS, run_fresh_interpreter
from test_trainable import load_recipe, select, tiny_unet
from tiny import tiny_config

from facevid.checkpoints import list_checkpoints
from facevid.pipeline import FaceVidPipeline
from facevid.schema import ConfigError
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer
from models.lora import LORA_WEIGHT_NAME, load_lora, lora_targets, read_lora
from models.pretrained import from_unet3d, load_pretrained_unet
from models.unet3d import FaceVidUNet3D

REPO = Path(__file__).resolve().parents[1]
export = task_runs.entry_point("export")
ATTENTION = ["*.to_q", "*.to_k", "*.to_v", "*.to_out"]
LORA = ["train.trainable=lora", "lora.rank=4", "lora.alpha=8"]  # scale 2: alpha is honoured, not assumed = rank


def test_lora_trains_exactly_the_adapter_parameters(tmp_path):
    targets = lora_targets(tiny_unet(), ATTENTION)
    # Every attention projection: self, cross and temporal attention, down, mid and up.
    assert len(targets) == 4 * 15 and all(t.rpartition(".")[2] in ("to_q", "to_k", "to_v", "to_out") for t in targets)
    model, names = select(tmp_path, *LORA)
    modules = dict(tiny_unet().named_modules())
    expected = sum(4 * (modules[t].in_features + modules[t].out_features) for t in targets)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * len(targets) and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    model, names = select(tmp_path, *LORA, "lora.target_modules=['*.to_q', '*.spatial.ff.*']")
    adapted = {n.partition(".lora_")[0] for n in names}
    assert any(a.endswith(".spatial.ff.3") for a in adapted) and not any(a.endswith("to_k") for a in adapted)


def test_lora_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.target_modules.*'\*\.to_z' matches no Linear or Conv layer"):
        select(tmp_path, *LORA, "lora.target_modules=['*.to_z']")
    with pytest.raises(ConfigError, match=r"'\*\.self_attn' matches no Linear.*not Linear / Conv"):
        select(tmp_path, *LORA, "lora.target_modules=['*.self_attn']")
    with pytest.raises(ConfigError, match="lora.rank"):
        select(tmp_path, *LORA, "lora.rank=0")
    with pytest.raises(ConfigError, match="train.trainable_exclude.*not used with train.trainable=lora"):
        select(tmp_path, *LORA, "train.trainable_exclude=[conv_in.*]")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """The same LoRA run straight (4 steps) and preempted at step 2 then resumed; the straight run's trained model."""
    manifest, vae = task_runs.synth_manifest(tmp_path_factory), task_runs.random_vae(tmp_path_factory)
    pretrained = task_runs.tiny_unet3d(tmp_path_factory)
    root = tmp_path_factory.mktemp("lora")
    # LoRA takes a higher learning rate than full training; 1e-2 moves the frames visibly in 4 steps.
    common = ["train.max_steps=4", f"unet.pretrained={pretrained}", "sample.num_inference_steps=2",
              "train.learning_rate=1e-2", *LORA]
    straight = tiny_config(manifest, root / "straight", *common, vae=vae)
    trainer = Trainer(straight, TextToVideoStage(straight))
    trainer.fit()
    first = tiny_config(manifest, root / "resumed", *common, vae=vae)
    Trainer(first, PreemptedStage(first, at=2)).fit()
    second = tiny_config(manifest, root / "resumed", *common, "resume=latest", vae=vae)
    Trainer(second, TextToVideoStage(second)).fit()
    return root / "straight", root / "resumed", trainer.accelerator.unwrap_model(trainer.model), pretrained


def test_lora_run_saves_adapters_keeps_base_weights_and_resumes_exactly(lora_runs):
    straight, resumed, model, pretrained = lora_runs
    assert sorted(losses(straight)) == [1, 2, 3, 4] and losses(straight) == losses(resumed)
    initial = load_pretrained_unet(str(pretrained), "unet3d").state_dict()
    targets = lora_targets(load_pretrained_unet(str(pretrained), "unet3d"), ATTENTION)
    expected_keys = {f"unet.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    for run in (straight, resumed):
        assert not (run / "unet_ema").exists()  # the EMA covers the adapters only: lora_ema/
        base = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
        assert base.keys() == initial.keys() and all(torch.equal(base[k], initial[k]) for k in base)
    for folder in ("lora", "lora_ema"):
        state, config = read_lora(straight / folder)
        again, _ = read_lora(resumed / folder)
        assert state.keys() == again.keys() == expected_keys
        assert all(torch.equal(state[k], again[k]) for k in state), folder
        assert (config["r"], config["lora_alpha"]) == (4, 8) and sorted(config["target_modules"]) == sorted(targets)
        assert all(state[k].abs().sum() > 0 for k in state)  # lora_B started at zero: trained
    optimizer = torch.load(list_checkpoints(straight)[-1] / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == len(expected_keys)

    # The saved adapter on a fresh copy of the base computes what the trained model computes.
    reloaded = FaceVidUNet3D.from_pretrained(straight / "unet")
    load_lora(reloaded, straight / "lora")
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 7, 384)
    with torch.no_grad():
        trained = model.eval()(sample, torch.tensor([500]), text)
        assert torch.equal(reloaded.eval()(sample, torch.tensor([500]), text), trained)
        plain = from_unet3d(UNet3DConditionModel.from_pretrained(pretrained)).eval()
        assert (plain(sample, torch.tensor([500]), text) - trained).abs().max() > 1e-4  # the adapter matters


LOADER = """
import json, sys, numpy as np, torch
from diffusers import DiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
out = sys.argv[1]
kwargs = dict(num_frames=4, height=16, width=16, guidance_scale={g}, num_inference_steps={s}, output_type="np")
merged = DiffusionPipeline.from_pretrained(out + "/merged")
np.save(out + "/merged.npy", merged("a person talking", generator=torch.Generator().manual_seed({seed}),
                                    **kwargs).frames)
pipe = DiffusionPipeline.from_pretrained(out + "/base")
with safe_open(out + "/base/pytorch_lora_weights.safetensors", "pt") as f:  # as the export's README.md says
    state = {{k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}}
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
config = {{k.removeprefix("unet."): v for k, v in meta.items()}}
inject_adapter_in_model(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                   target_modules=config["target_modules"]), pipe.unet)
result = set_peft_model_state_dict(pipe.unet, state)
assert not result.unexpected_keys, result.unexpected_keys
np.save(out + "/base.npy", pipe("a person talking", generator=torch.Generator().manual_seed({seed}), **kwargs).frames)
print(type(merged).__name__, type(merged.unet).__name__)
""".format(g=GUIDANCE, s=STEPS, seed=SEED)


def test_export_merge_lora_and_base_plus_adapter_match_sample_py(lora_runs, tmp_path):
    straight = lora_runs[0]
    assert export.main(["--run", str(straight), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert export.main(["--run", str(straight), "--out", str(tmp_path / "base")]) == 0
    assert not (tmp_path / "merged" / LORA_WEIGHT_NAME).exists()
    base_unet = load_file(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    pretrained = load_file(lora_runs[3] / "diffusion_pytorch_model.safetensors")
    assert base_unet.keys() == pretrained.keys() and all(torch.equal(base_unet[k], pretrained[k]) for k in pretrained)
    state, config = read_lora(tmp_path / "base")  # UNet3DConditionModel's module names
    assert all(k.startswith("unet.") for k in state) and any(".attn1.to_out.0.lora_A." in k for k in state)
    assert all(m + ".weight" in pretrained for m in config["target_modules"])
    assert "pytorch_lora_weights.safetensors" in (tmp_path / "base" / "README.md").read_text()

    result = run_fresh_interpreter(LOADER, tmp_path)
    assert "TextToVideoSDPipeline UNet3DConditionModel" in result.stdout
    pipe = FaceVidPipeline.from_run(straight)  # what sample.py samples with: base + lora_ema, merged
    assert pipe.weights == "unet + lora_ema"
    ours = pipe(["a person talking"], num_frames=4, resolution=16, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, seed=SEED).astype(int)
    merged = (np.load(tmp_path / "merged.npy") * 255).round().astype(int)
    # Observed: 0 grey levels for both below, 20 without the adapter.
    # The same merged weights: at most one grey level for float -> uint8 rounding and the thread count.
    assert merged.shape == ours.shape and np.abs(merged - ours).max() <= 1
    # Unmerged adapters compute x W + s (x A) B instead of x (W + s B A): float rounding differs a little more.
    unmerged = (np.load(tmp_path / "base.npy") * 255).round().astype(int)
    assert np.abs(unmerged - ours).max() <= 2
    unadapted = FaceVidPipeline.from_run(straight, apply_lora=False)(
        ["a person talking"], num_frames=4, resolution=16, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        seed=SEED).astype(int)
    assert np.abs(unadapted - ours).max() > 10  # the comparisons above can tell a missing adapter apart


def test_merge_lora_refused_for_a_run_without_adapters(tmp_path_factory, tmp_path, capsys):
    run = task_runs.trained_run(tmp_path_factory, "t2v_from_unet3d",
                                f"unet.pretrained={task_runs.tiny_unet3d(tmp_path_factory)}")
    assert export.main(["--run", str(run), "--out", str(tmp_path / "x"), "--merge-lora"]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_lora_under_two_rank_ddp(tmp_path_factory, tmp_path):
    """LoRA in a real 2-rank gloo group: the adapters stay identical on both ranks every step."""
    run = tmp_path / "ddp"
    # demo.yaml's text-layout heads and pooled text are for a UNet it builds, not for a pretrained one.
    log = launch_demo("cpu_2proc.yaml", task_runs.synth_manifest(tmp_path_factory),
                      task_runs.random_vae(tmp_path_factory), run,
                      f"unet.pretrained={task_runs.tiny_unet3d(tmp_path_factory)}", "train.max_steps=3",
                      "sample.num_inference_steps=2", "plugin.options.text_layout=false",
                      "plugin.options.text_motion_frames=0", "unet.pooled_text_conditioning=false", *LORA,
                      timeout_s=300)
    assert "on 2 process(es)" in log and "train.trainable=lora" in log
    for step in range(1, 4):
        assert f"step {step}: weights identical on all 2 rank(s)" in log
    assert json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())["world_size"] == 2
    assert read_lora(run / "lora_ema")[0]


def test_lora_modelscope_config_is_lora_on_a_pretrained_unet3d(tmp_path):
    cfg = load_recipe("configs/lora_modelscope_256.yaml", tmp_path)
    assert (cfg.train.trainable, cfg.unet.pretrained_format, cfg.lora.rank) == ("lora", "unet3d", 16)
    assert list(cfg.lora.target_modules) == ATTENTION
