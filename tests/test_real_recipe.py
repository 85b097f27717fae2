"""The shipped GPU recipe, configs/t2v_256.yaml, end to end on stand-ins in the real formats (tests/real_format.py):
an SD-style VAE folder, a CLIP or T5 text-encoder folder with its real tokenizer, real FaceVid-Synth mp4 files at
25 fps (so the recipe's target_fps 6.25 takes every 4th frame). Only sizes are overridden (resolution, widths, steps,
batch), plus the local paths and data.cache=use (after cache.py). The chain: cache.py -> train.py in bf16 autocast
-> SIGTERM -> resume -> sample.py with a negative prompt and guidance -> export.py -> the export loaded with
diffusers in a fresh process -> evaluate.py with FVD (a stand-in I3D file, the protocol recorded), the CLIP score (a
tiny random CLIPModel) and attribute alignment.

CLIP runs in the default suite, T5 is marked slow (the same path with another encoder family).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import real_format
import task_runs
import torch
from safetensors.torch import load_file

from data import synth
from data.video import probe_video, read_frames
from facevid.checkpoints import list_checkpoints
from facevid.config import load_config
from facevid.pipeline import FaceVidPipeline
from models.text_encoder import FrozenTextEncoder

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "t2v_256.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "WANDB_MODE": "offline"}
STEPS, NEGATIVE = 2, "blurry, distorted face"
PROMPT = "a person with red hair talking"


def recipe_overrides(run: Path, manifest: Path, cache: Path, encoder: Path, vae: Path) -> list[str]:
    """Sizes (and local paths) only, and one known defect's workaround: everything else is the shipped recipe (v-prediction with zero-terminal SNR,
    min-SNR, offset noise, bf16, EMA 0.9999, gradient checkpointing, accumulation 2, max_length 77, dpm++ 30
    steps at guidance 7.5 for validation, ...)."""
    return [
        f"output_dir={run}", f"data.manifest={manifest}", f"data.cache_dir={cache}",
        f"text_encoder.pretrained={encoder}", f"vae.pretrained={vae}",
        # 64 px = VAE factor 8 x 4 UNet levels (factor 8): 8x8 latents, 1x1 at the bottom.
        "data.resolution=64", "data.num_frames=4", "data.num_workers=0",
        "unet.block_out_channels=[32,32,32,32]", "unet.layers_per_block=1", "unet.attention_head_dim=16",
        "train.batch_size=1", "train.max_steps=4", "train.lr_warmup_steps=1", "train.log_every=1",
        "sample.num_inference_steps=2",
        # The recipe's own tracker (wandb, offline here): it once stopped train.py before step 1.
    ]


def run_script(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=ENV,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def logged_steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]


def train_until_sigterm(args: list[str], run: Path, timeout: float = 240) -> str:
    """Start train.py, send it SIGTERM once step 1 is logged (as a cluster's preemption would), wait for it."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO, env=ENV)
    deadline = time.time() + timeout
    try:
        while not logged_steps(run) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=max(deadline - time.time(), 10))
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # 25 fps, 16 frames: the recipe's target_fps 6.25 reads frames 0, 4, 8, 12.
    return synth.generate(tmp_path_factory.mktemp("synth25"), num_clips=3, num_frames=16, resolution=64, fps=25.0,
                          seed=4, progress=False)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_format")
    return {"vae": real_format.sd_vae(root / "sd-vae-ft-mse"), "clip": real_format.clip_text_encoder(root / "clip-l"),
            "t5": real_format.t5_text_encoder(root / "t5-v1_1"), "clip_model": real_format.clip_model(root / "clip-b"),
            "i3d": real_format.i3d_torchscript(root / "i3d_torchscript.pt")}


def test_clip_tokenizer_reproduces_openai_ids():
    tokenizer = real_format.clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_frozen_text_encoder_loads_both_families(stand_ins):
    for family, model_class, pad_id in (("clip", "CLIPTextModel", 49407), ("t5", "T5EncoderModel", 0)):
        encoder = FrozenTextEncoder(str(stand_ins[family]), max_length=77)
        assert type(encoder.model).__name__ == model_class and encoder.hidden_size == 32
        hidden, mask = encoder([PROMPT, ""])
        assert hidden.shape == (2, 77, 32) and torch.isfinite(hidden).all()
        assert mask[0].sum() > mask[1].sum() >= 1  # the empty prompt still has its special token(s)
        ids = encoder.tokenizer([""], padding="max_length", max_length=77)["input_ids"][0]
        assert ids[-1] == pad_id
    t5 = FrozenTextEncoder(str(stand_ins["t5"]), max_length=77).tokenizer
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1) and t5(PROMPT)["input_ids"][-1] == 1
    assert t5.unk_token_id not in t5(PROMPT)["input_ids"]  # trained on FaceVid-Synth captions


def test_sd_vae_stand_in_has_the_recipe_format(stand_ins):
    cfg = json.loads((stand_ins["vae"] / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] == 0.18215
    assert len(cfg["block_out_channels"]) == 4 and cfg["latent_channels"] == 4  # factor 8, 4 channels


LOADER = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])  # the recipe's ModelScope layout: a standard folder
frames = pipe({prompt!r}, negative_prompt={negative!r}, num_inference_steps={steps}, guidance_scale=7.5,
              num_frames=4, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="np").frames
np.save(sys.argv[2], (np.asarray(frames) * 255).round().astype(np.uint8))
assert "facevid" not in sys.modules
print(type(pipe).__name__, type(pipe.unet).__name__, type(pipe.text_encoder).__name__, type(pipe.vae).__name__)
""".format(prompt=PROMPT, negative=NEGATIVE, steps=STEPS)


@pytest.mark.parametrize("family", ["clip", pytest.param("t5", marks=pytest.mark.slow)])
def test_shipped_recipe_end_to_end(family, manifest, stand_ins, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    overrides = recipe_overrides(run, manifest, cache, stand_ins[family], stand_ins["vae"])
    cfg = load_config(RECIPE, overrides)  # the shipped file with sizes overridden validates
    assert cfg.train.mixed_precision == "bf16" and cfg.data.target_fps == 6.25 and cfg.unet.gradient_checkpointing

    # 1. cache.py: latents + text embeddings.
    run_script(["cache.py", "--config", str(RECIPE), *overrides])
    assert (cache / "fingerprint.json").is_file()

    # 2. train.py from the cache in bf16 autocast, stopped by SIGTERM after step 1 ...
    train = ["train.py", "--config", str(RECIPE), *overrides, "data.cache=use"]
    output = train_until_sigterm(train, run)
    assert "mixed precision bf16" in output and "received SIGTERM" in output
    assert f"training from the latent cache in {cache}" in output
    stopped = [int(p.name.split("-")[1]) for p in list_checkpoints(run)]
    assert stopped and stopped[-1] < cfg.train.max_steps and not (run / "unet").exists()

    # ... 3. and resumed to the end.
    output = run_script([*train, "resume=latest"]).stdout
    state = json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == cfg.train.max_steps
    assert logged_steps(run) == list(range(1, cfg.train.max_steps + 1))  # every step once, none repeated
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(np.isfinite(losses))
    ema = load_file(run / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in ema.values())

    # 4. sample.py with a negative prompt and classifier-free guidance (the recipe's 7.5).
    sample = task_runs.entry_point("sample")
    for name, negative in (("neg", NEGATIVE), ("plain", "")):
        assert sample.main(["--run", str(run), "--prompt", PROMPT, "--negative-prompt", negative, "--steps",
                            str(STEPS), "--seed", "0", "--out", str(tmp_path / name)]) == 0
    videos = {name: read_frames(next((tmp_path / name).glob("*.mp4")), range(4)) for name in ("neg", "plain")}
    info = probe_video(next((tmp_path / "neg").glob("*.mp4")))
    assert (info.num_frames, info.width, info.height) == (4, 64, 64)
    assert not np.array_equal(videos["neg"], videos["plain"])  # the negative prompt reaches the guidance

    # 5. export.py, loaded with diffusers in a fresh process: the same frames as FaceVidPipeline.
    export = task_runs.entry_point("export")
    assert export.main(["--run", str(run), "--out", str(tmp_path / "export")]) == 0
    loaded = run_script(["-c", LOADER, str(tmp_path / "export"), str(tmp_path / "frames.npy")])
    encoder_class = {"clip": "CLIPTextModel", "t5": "T5EncoderModel"}[family]
    assert f"TextToVideoSDPipeline UNet3DConditionModel {encoder_class} AutoencoderKL" in loaded.stdout
    # The standard pipeline has no CFG rescale: the export's README says its frames are sample.py's at rescale 0.
    ours = FaceVidPipeline.from_run(run)([PROMPT], negative_prompt=NEGATIVE, num_frames=4, resolution=64,
                                         num_inference_steps=STEPS, guidance_scale=7.5, seed=0, guidance_rescale=0.0)
    theirs = np.load(tmp_path / "frames.npy")
    # One grey level for float sums on another thread count.
    assert theirs.shape == ours.shape == (1, 4, 64, 64, 3) and np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1

    # 6. evaluate.py on two dataset clips: FVD (a stand-in I3D file), CLIP score (a random CLIPModel folder) and
    # FaceVid-Synth attribute alignment. The real clips are read as training reads them: every 4th frame at 25 fps.
    evaluate = task_runs.entry_point("evaluate")
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--dataset", str(manifest), "--limit", "2", "--metrics",
                          "fvd,clip,alignment", "--i3d", str(stand_ins["i3d"]), "--clip", str(stand_ins["clip_model"]),
                          "--steps", str(STEPS), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    m = result["metrics"]
    assert m["clip"]["num_videos"] == 2 and np.isfinite(m["clip"]["clip_score"])
    assert m["alignment"]["num_videos"] == 2 and "reference_real" in m["alignment"]
    assert result["generation"]["resolution"] == 64 and result["generation"]["guidance_scale"] == 7.5
    assert np.isfinite(m["fvd"]["value"]) and m["fvd"]["label"] == "FVD (n=2, not comparable to published)"
    protocol = m["fvd"]["protocol"]
    assert (protocol["real_fps"], protocol["training_fps"], protocol["frames_per_video"]) == ([6.25], 6.25, 4)
    assert protocol["real"]["manifest"] == str(manifest) and protocol["real"]["same_frame_rate_as_training"]


# ----------------------------------------------------------------------------- bench/gpu_check.py


def test_gpu_check_reduced_mode_prints_a_consistent_table():
    result = run_script(["bench/gpu_check.py", "--reduced", "--threads", "1", "--steps", "2", "--warmup", "1",
                         "--peak-tflops", "2"], timeout=120)
    lines = result.stdout.splitlines()
    assert "REDUCED mode" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("| backend |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    assert columns == ["backend", "s/step", "samples/s", "latent tokens/s", "model TFLOP/s", "MFU",
                       "peak allocated GiB", "peak reserved GiB"]
    row = dict(zip(columns, (c.strip() for c in lines[header + 2].strip("|").split("|"))))
    assert row["backend"] == "sdpa" and row["peak allocated GiB"] == row["peak reserved GiB"] == "n/a"  # no CUDA
    seconds, samples, tokens, tflops = (float(row[k]) for k in ("s/step", "samples/s", "latent tokens/s",
                                                                "model TFLOP/s"))
    flops = float(next(line for line in lines if line.startswith("model FLOPs per step:")).split()[4]) * 1e12
    assert seconds > 0 and samples == pytest.approx(1 / seconds, rel=1e-2)  # batch 1
    assert tokens == pytest.approx(samples * 4 * 16 * 16, rel=1e-2)  # latents 4 frames x 16 x 16
    assert tflops == pytest.approx(flops / seconds / 1e12, rel=1e-2)
    assert float(row["MFU"].rstrip("%")) == pytest.approx(100 * tflops / 2, rel=1e-2)  # against --peak-tflops 2
    # The full-width recipe UNet (ModelScope layout: temporal convs and transformers, 768-wide text), on the meta device.
    assert "1404.8M parameters" in result.stdout and "DDP: skipped (reduced mode)" in result.stdout


def test_gpu_check_counts_the_flops_a_real_pass_executes():
    """The meta-device count equals FlopCounterMode over a real forward + backward of the same UNet (math
    attention, no checkpointing), and it scales with the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO))
    from bench.gpu_check import REDUCED, model_flops
    from facevid.stages.text_to_video import build_unet

    cfg = load_config(RECIPE, REDUCED, validate_files=False)
    counted, params = model_flops(cfg, 1, 2, 8, 32)
    torch.manual_seed(0)
    model = build_unet(cfg.unet, 4, 0, 32)
    model.set_attention_backend("math")
    assert params == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 4, 2, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32),
              torch.ones(1, 77, dtype=torch.bool)).pow(2).mean().backward()
    assert counted == counter.get_total_flops() > 0
    assert model_flops(cfg, 3, 2, 8, 32)[0] == 3 * counted


@pytest.mark.slow
def test_gpu_check_ddp_run_on_two_cpu_processes(stand_ins):
    """The DDP part's command (train.py with the recipe, 2 ranks, replica check every step) on gloo at reduced size:
    what a 2-GPU machine runs with NCCL, minus the sizes."""
    result = run_script(["bench/gpu_check.py", "--threads", "1", "--steps", "1", "--warmup", "0", "--ddp-on-cpu",
                         "--ddp-steps", "3", "--vae", str(stand_ins["vae"]), "--text-encoder",
                         str(stand_ins["clip"])], timeout=300)
    assert "replicas identical at 3 of 3 steps -> PASS" in result.stdout
    assert "s/step (optimizer step, after the first):" in result.stdout
