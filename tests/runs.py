"""What the training tests check the same way on every backbone and data setup: a model fits a fixed batch, a run
stopped by SIGTERM and resumed equals the uninterrupted run, `accelerate launch` of configs/demo.yaml on 2 CPU
ranks. Everything goes through the production code (Objective, Trainer, train.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from test_engines import free_port
from tiny import TINY

from facevid.checkpoints import list_checkpoints
from facevid.diffusion import build_noise_scheduler
from facevid.objective import Objective
from facevid.schema import DiffusionConfig, RunConfig
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def logged_steps(run: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows (those with a loss) by step."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row for row in rows if "loss" in row}


def losses(run: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in logged_steps(run).items()}


def fixed_batch_losses(model: torch.nn.Module, steps: int = 25, lr: float = 2e-3) -> list[float]:
    """The training loss over `steps` AdamW steps (fused, as the Trainer's) on one fixed problem: the same latents
    (2 x 4 x 3 x 8 x 8), text (5 tokens of 384), noise and timesteps every step, so a model that learns fits it."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 8, 8, generator=generator)
    text = torch.randn(2, 5, 384, generator=generator)
    cfg = DiffusionConfig()
    objective = Objective.from_config(cfg, build_noise_scheduler(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    history = []
    for _ in range(steps):
        loss = objective.loss(lambda x, t: model(x, t, text), latents, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


class PreemptedStage(TextToVideoStage):
    """Sends its own process SIGTERM during micro-batch `at`, as a cluster's preemption would."""

    def __init__(self, cfg, at: int):
        super().__init__(cfg)
        self.calls, self.at = 0, at

    def compute_loss(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_loss(model, batch, generator)


def train_straight_and_resumed(config: Callable[..., RunConfig], root: Path, stop_at_step: int) -> tuple[Path, Path]:
    """The same run twice: root/straight uninterrupted, root/resumed stopped by SIGTERM during step `stop_at_step`
    (its last micro-batch) and resumed with resume=latest. config(run_dir, *overrides) builds the run's config.

    Checks the preempted run left exactly its step's checkpoint and no final weights. Returns (straight, resumed).
    """
    straight, resumed = root / "straight", root / "resumed"
    cfg = config(straight)
    Trainer(cfg, TextToVideoStage(cfg)).fit()
    cfg = config(resumed)
    Trainer(cfg, PreemptedStage(cfg, at=stop_at_step * cfg.train.gradient_accumulation_steps)).fit()
    assert [p.name for p in list_checkpoints(resumed)] == [f"step-{stop_at_step:08d}"]
    assert not (resumed / "unet").exists()  # stopped early: no final weights yet
    cfg = config(resumed, "resume=latest")
    Trainer(cfg, TextToVideoStage(cfg)).fit()
    return straight, resumed


def assert_same_weights(a: Path, b: Path, folders=("unet", "unet_ema")) -> None:
    """The two runs' saved weights are bit-identical, folder by folder."""
    for folder in folders:
        first = load_file(a / folder / "diffusion_pytorch_model.safetensors")
        second = load_file(b / folder / "diffusion_pytorch_model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), folder


def demo_overrides(manifest: Path, vae: Path, run: Path, *overrides: str) -> list[str]:
    """configs/demo.yaml made tiny (tests/tiny.py), checking the replicas every step, no validation."""
    return [f"output_dir={run}", f"data.manifest={manifest}", f"vae.pretrained={vae}", "train.replica_check_every=1",
            "train.validate_every=0", "train.validation_prompts=[a person talking]",
            *[o for o in TINY if not o.startswith("train.validation_prompts")], *overrides]


def launch_demo(launch_config: str, manifest: Path, vae: Path, run: Path, *overrides: str,
                timeout_s: int = 400) -> str:
    """`accelerate launch --config_file configs/accelerate/<launch_config> train.py` with demo_overrides, as a user
    would start it; returns the log (stdout + stderr) of a run that must succeed."""
    # `timeout` ends the ranks too (subprocess's timeout would leave them running); a free port, not accelerate's
    # default 29500, which another test run on the machine may hold.
    cmd = ["timeout", "-k", "10", str(timeout_s), sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate" / launch_config), "--main_process_port", str(free_port()),
           str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"),
           *demo_overrides(manifest, vae, run, *overrides)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout_s + 30,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log
