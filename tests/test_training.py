"""End-to-end training on tiny real runs: VAE stage, text-to-video stage, exact resume, 2-rank DDP,
sampling. Every run goes through the production Trainer on real FaceVid-Synth mp4 files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from tiny import TINY, tiny_config, train_tiny_vae

from data import synth
from data.video import probe_video, read_frames
from facevid.config import DiffusionConfig
from facevid.diffusion import build_noise_scheduler
from facevid.objective import Objective
from facevid.pipeline import FaceVidPipeline
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer, list_checkpoints
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


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


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
    cfg = DiffusionConfig()
    objective = Objective.from_config(cfg, build_noise_scheduler(cfg))
    latents, text = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 384)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, fused=True)
    history = []
    for _ in range(25):
        # The same noise and timesteps every step: a fixed problem the model must fit.
        loss = objective.loss(lambda x, t: unet(x, t, text), latents, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]


class _PreemptedStage(TextToVideoStage):
    """Sends its own process SIGTERM during micro-batch `at`, as a cluster's preemption would."""

    def __init__(self, cfg, at: int):
        super().__init__(cfg)
        self.calls, self.at = 0, at

    def compute_loss(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_loss(model, batch, generator)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_exact_resume_after_sigterm(synth_manifest, tiny_vae, tmp_path, accumulation):
    """N steps, SIGTERM, resume, N more == 2N uninterrupted: same losses and bit-identical weights.

    12 clips at batch 2 make 6 batches an epoch, so the resumed half also crosses an epoch boundary.
    """
    # Two persistent workers (the default data.persistent_workers) prefetching across the resume point.
    common = ["train.max_steps=8", "data.num_workers=2", f"train.gradient_accumulation_steps={accumulation}"]
    straight = tiny_config(synth_manifest, tmp_path / "straight", *common, vae=tiny_vae)
    Trainer(straight, TextToVideoStage(straight)).fit()

    first = tiny_config(synth_manifest, tmp_path / "resumed", *common, vae=tiny_vae)
    Trainer(first, _PreemptedStage(first, at=3 * accumulation)).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000003"]
    assert not (tmp_path / "resumed" / "unet").exists()  # stopped early: no final weights yet

    second = tiny_config(synth_manifest, tmp_path / "resumed", *common, "resume=latest", vae=tiny_vae)
    Trainer(second, TextToVideoStage(second)).fit()

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    for folder in ("unet", "unet_ema"):
        a = load_file(tmp_path / "straight" / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "resumed" / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_half_written_checkpoint_is_ignored(t2v_run):
    latest = list_checkpoints(t2v_run)[-1]
    tmp = latest.parent / ".tmp-step-00000099"  # what a crash in the middle of a save leaves
    tmp.mkdir()
    assert list_checkpoints(t2v_run)[-1] == latest
    tmp.rmdir()


def test_two_rank_ddp_on_cpu(synth_manifest, tiny_vae, tmp_path):
    """The documented command forms one real 2-rank gloo group: data split, weights equal every step."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), str(REPO / "train.py"), "--config",
           str(REPO / "configs/demo.yaml"), f"output_dir={run}", f"data.manifest={synth_manifest}",
           f"vae.pretrained={tiny_vae}", "train.max_steps=6", "train.replica_check_every=1",
           "train.validate_every=0", "train.validation_prompts=[a person talking]",
           *[o for o in TINY if not o.startswith("train.validation_prompts")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
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
