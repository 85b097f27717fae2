"""End-to-end training on tiny real runs: VAE stage, text-to-video stage, exact resume, 2-rank DDP,
sampling. Every run goes through the production Trainer on real FaceVid-Synth mp4 files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from runs import assert_same_weights, fixed_batch_losses, launch_demo, losses, train_straight_and_resumed
from tiny import tiny_config, train_tiny_vae

from data import synth
from data.video import probe_video, read_frames
from facevid.checkpoints import list_checkpoints
from facevid.pipeline import FaceVidPipeline
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer
from models.unet3d import FaceVidUNet3D

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synth.generate(out, num_clips=12, num_frames=8, resolution=32, fps=8.0, seed=1, progress=False)


@pytest.fixture(scope="session")
def tiny_vae(synth_manifest, tmp_path_factory):
    return train_tiny_vae(synth_manifest, tmp_path_factory.mktemp("vae_run"), steps=3)


@pytest.fixture(scope="session")
def t2v_run(synth_manifest, tiny_vae, tmp_path_factory):
    run = tmp_path_factory.mktemp("t2v_run")
    cfg = tiny_config(synth_manifest, run, "train.max_steps=4", vae=tiny_vae)
    Trainer(cfg, TextToVideoStage(cfg)).fit()
    return run


def test_vae_stage_writes_a_scaled_loadable_vae(tiny_vae):
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor != 1.0  # measured on the data at the end of the stage
    run = tiny_vae.parent
    assert (run / "config.yaml").is_file() and list_checkpoints(run)
    recon = list((run / "samples").rglob("*.mp4"))
    assert recon and probe_video(recon[0]).num_frames == 4
    assert "val/psnr" in (run / "metrics.jsonl").read_text()


def test_t2v_run_writes_weights_ema_and_samples(t2v_run):
    assert (t2v_run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (t2v_run / "unet_ema").is_dir() and (t2v_run / "scheduler" / "scheduler_config.json").is_file()
    assert sorted(losses(t2v_run)) == [1, 2, 3, 4]
    state = json.loads((list_checkpoints(t2v_run)[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    samples = list((t2v_run / "samples").rglob("*.mp4"))
    assert samples and probe_video(samples[0]).num_frames == 4


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    unet = FaceVidUNet3D(in_channels=4, out_channels=4, block_out_channels=(32, 32), attention_levels=(False, True),
                         attention_head_dim=16, cross_attention_dim=384, norm_num_groups=32)
    history = fixed_batch_losses(unet)
    assert history[-1] < 0.5 * history[0]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_exact_resume_after_sigterm(synth_manifest, tiny_vae, tmp_path, accumulation):
    """N steps, SIGTERM, resume, N more == 2N uninterrupted: same losses and bit-identical weights.

    12 clips at batch 2 make 6 batches an epoch, so the resumed half also crosses an epoch boundary.
    """
    # Two persistent workers (the default data.persistent_workers) prefetching across the resume point.
    common = ["train.max_steps=8", "data.num_workers=2", f"train.gradient_accumulation_steps={accumulation}"]
    straight, resumed = train_straight_and_resumed(
        lambda run, *extra: tiny_config(synth_manifest, run, *common, *extra, vae=tiny_vae), tmp_path, stop_at_step=3)
    assert losses(straight) == losses(resumed)
    assert_same_weights(straight, resumed)


def test_half_written_checkpoint_is_ignored(t2v_run):
    latest = list_checkpoints(t2v_run)[-1]
    tmp = latest.parent / ".tmp-step-00000099"  # what a crash in the middle of a save leaves
    tmp.mkdir()
    assert list_checkpoints(t2v_run)[-1] == latest
    tmp.rmdir()


def test_two_rank_ddp_on_cpu(synth_manifest, tiny_vae, tmp_path):
    """The documented command forms one real 2-rank gloo group: data split, weights equal every step."""
    run = tmp_path / "ddp"
    log = launch_demo("cpu_2proc.yaml", synth_manifest, tiny_vae, run, "train.max_steps=6", timeout_s=300)
    assert "on 2 process(es)" in log
    for step in range(1, 7):
        assert f"step {step}: weights identical on all 2 rank(s)" in log
    state = json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())
    # 12 clips split over 2 ranks at batch 2 = 3 steps an epoch (one rank alone would need 6):
    # step 6 is the last batch of the second epoch.
    assert state["world_size"] == 2 and state["global_step"] == 6
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 3)
    assert (run / "checkpoints" / "step-00000006" / "noise_generator_1.pt").is_file()


def test_sampling_is_deterministic_by_seed(t2v_run):
    pipe = FaceVidPipeline.from_run(t2v_run)
    assert pipe.weights == "unet_ema"
    kwargs = dict(num_frames=4, resolution=16, num_inference_steps=3, guidance_scale=2.0)
    a = pipe(["a person with red hair talking", "a person with gray hair"], seed=5, **kwargs)
    b = pipe(["a person with red hair talking"], seed=5, **kwargs)
    c = pipe(["a person with red hair talking"], seed=6, **kwargs)
    assert a.shape == (2, 4, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a[0], b[0])  # independent of the other prompts in the batch
    assert not np.array_equal(b, c)
    ddim = pipe(["a person with red hair talking"], seed=5, scheduler="ddim", **kwargs)
    assert ddim.shape == b.shape
    # One seed per video: the second prompt sampled with the first one's noise, as if alone with seed 5.
    same = pipe(["a person with red hair talking", "a person with gray hair"], seed=[5, 5], **kwargs)
    alone = pipe(["a person with gray hair"], seed=5, **kwargs)
    assert np.array_equal(same[0], b[0]) and np.array_equal(same[1], alone[0]) and not np.array_equal(same[1], a[1])
    with pytest.raises(ValueError, match="one seed per video"):
        pipe(["a person talking"], seed=[1, 2], **kwargs)


def test_sample_cli_writes_playable_files(t2v_run, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "sample.py"), "--run", str(t2v_run), "--prompt", "a person talking",
           "--prompt", "a person with glasses, still", "--steps", "3", "--seed", "1", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == 2 and len(list(out.glob("*.gif"))) == 2 and (out / "all.png").is_file()
    assert str(mp4s[0]) in result.stdout
    info = probe_video(mp4s[0])
    assert (info.num_frames, info.width, info.height) == (4, 16, 16)


def test_sample_cli_same_seed_gives_every_prompt_the_same_noise(t2v_run, tmp_path):
    def sample(*extra):
        out = tmp_path / "-".join(extra or ("plain",))
        cmd = [sys.executable, str(REPO / "sample.py"), "--run", str(t2v_run), "--prompt", "a person talking",
               "--prompt", "a person talking", "--steps", "2", "--seed", "3", "--out", str(out), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return [read_frames(p, range(4)) for p in sorted(out.glob("*.mp4"))]

    first, second = sample("--same-seed")
    assert np.array_equal(first, second)  # the same prompt with the same noise: the same video
    first, second = sample()
    assert not np.array_equal(first, second)  # seeds 3 and 4


def test_sample_cli_refuses_a_vae_run(tiny_vae, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--run", str(tiny_vae.parent), "--prompt", "x"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "needs a text-to-video" in result.stderr
