"""Distributed engines on the CPU (2 gloo ranks): FSDP2 shards, trains, checkpoints, resumes exactly and
consolidates; a launch that asks for FSDP2 and would silently get DDP fails.

Two kinds of tests: the engine alone on two forked ranks (seconds), and the production `accelerate launch
train.py` with configs/accelerate/fsdp2_2proc_cpu.yaml. Every one checks that sharding is really in use
(DTensor parameters, distributed_type FSDP, a checkpoint whose tensors are split over both ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY, train_tiny_vae

from data import synth
from facevid.trainer import list_checkpoints
from models.unet3d import FaceVidUNet3D

REPO = Path(__file__).resolve().parents[1]
FSDP2_CPU = REPO / "configs/accelerate/fsdp2_2proc_cpu.yaml"
DDP_CPU = REPO / "configs/accelerate/cpu_2proc.yaml"
# What `accelerate launch --config_file configs/accelerate/fsdp2*.yaml` exports to the training processes.
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "UNetLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
             "FSDP_RESHARD_AFTER_FORWARD": "true"}


def free_port() -> int:
    # Other test runs on this machine may hold accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(fn, *args, timeout_s: float = 120) -> None:
    """fn(rank, *args) on two forked processes forming one gloo group; a failure on either rank fails the
    test, a hang is killed after timeout_s."""
    from torch.multiprocessing import start_processes

    context = start_processes(fn, args=(free_port(), *args), nprocs=2, start_method="fork", join=False)
    deadline = time.time() + timeout_s
    while not context.join(timeout=2):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2-rank run did not finish in {timeout_s} s")


def _join_group(rank: int, port: int, extra_env: dict[str, str]):
    """This process as `rank` of a 2-rank CPU group, built the way the Trainer builds it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from facevid.engine import process_group_kwargs

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
    AcceleratorState._reset_state(True)  # the fork inherits the parent's (single-process) state
    return Accelerator(cpu=True, kwargs_handlers=[process_group_kwargs(60)])


def tiny_unet() -> FaceVidUNet3D:
    torch.manual_seed(0)  # the same initial weights on every rank, as set_seed gives the Trainer
    return FaceVidUNet3D(block_out_channels=(32, 32), attention_levels=(False, True), attention_head_dim=16,
                         cross_attention_dim=8, temporal_feed_forward=True)


def _fsdp2_engine_rank(rank: int, port: int, folder: str) -> None:
    from accelerate.utils import DistributedType
    from diffusers.training_utils import EMAModel
    from torch.distributed.tensor import DTensor, Shard

    from facevid.engine import build_engine

    acc = _join_group(rank, port, FSDP2_ENV)
    engine = build_engine(acc)
    assert engine.name == "fsdp2" and acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2
    unet = tiny_unet()
    initial = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = EMAModel(list(unet.parameters()), decay=0.9)
    acc.register_for_checkpointing(ema)  # its counters (the decay warms up with them), as the Trainer does
    model, optimizer, scheduler = engine.prepare(unet, optimizer, scheduler, ema)

    # Sharded: every parameter and its EMA shadow is a DTensor split along dim 0 over the two ranks.
    for p, shadow in zip(model.parameters(), ema.shadow_params):
        assert isinstance(p, DTensor) and p.placements == (Shard(0),) and p.device_mesh.size() == 2
        assert isinstance(shadow, DTensor) and shadow.placements == p.placements
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert local < 0.6 * total, (local, total)  # about half each, not a replica

    def step(seed: int) -> float:
        g = torch.Generator().manual_seed(seed * 2 + rank)  # each rank its own data, as in data parallelism
        sample, text = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
        loss = model(sample, torch.tensor([10, 500]), text).pow(2).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 0.5)  # DTensor-aware global norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return loss.item()

    step(1), step(2)
    engine.save_state(Path(folder), ema)
    losses = [step(3), step(4)]
    weights = [p.full_tensor() for p in model.parameters()]
    shadows = [s.full_tensor() for s in ema.shadow_params]
    engine.load_state(Path(folder), ema)  # back to step 2: model, optimizer and EMA shards
    assert [step(3), step(4)] == losses
    assert all(torch.equal(p.full_tensor(), w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(s.full_tensor(), w) for s, w in zip(ema.shadow_params, shadows))

    plain, plain_ema = engine.consolidated(model, ema)  # collective; rank 0 alone gets the full weights
    if rank == 0:
        assert type(plain) is FaceVidUNet3D and not any(isinstance(p, DTensor) for p in plain.parameters())
        assert all(torch.equal(p, w) for p, w in zip(plain.parameters(), weights))
        assert all(torch.equal(s, w) for s, w in zip(plain_ema.shadow_params, shadows))
        assert not torch.equal(plain.state_dict()["conv_in.weight"], initial["conv_in.weight"])  # it trained
        assert plain(torch.zeros(1, 4, 2, 8, 8), 5, torch.zeros(1, 3, 8)).shape == (1, 4, 2, 8, 8)
    else:
        assert plain is None and plain_ema is None
    acc.end_training()  # also destroys the process group


def test_fsdp2_engine_shards_trains_resumes_and_consolidates(tmp_path):
    run_two_ranks(_fsdp2_engine_rank, str(tmp_path / "checkpoint"))
    shards = sorted(p.name for p in (tmp_path / "checkpoint" / "ema_shards").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own part of the EMA


def _fallback_rank(rank: int, port: int, errors: str) -> None:
    import facevid.engine as engine_module

    acc = _join_group(rank, port, FSDP2_ENV)
    engine_module._switch_cpu_group_to_fsdp = lambda accelerator: None  # what Accelerate alone does: DDP
    try:
        engine_module.build_engine(acc)
    except RuntimeError as err:
        Path(errors, f"rank{rank}.txt").write_text(str(err))
    acc.end_training()  # also destroys the process group


def test_fsdp2_request_that_would_fall_back_to_ddp_fails(tmp_path):
    run_two_ranks(_fallback_rank, str(tmp_path))
    for rank in (0, 1):
        assert "silent fallback" in (tmp_path / f"rank{rank}.txt").read_text()


def test_unsupported_launch_configs_are_refused(monkeypatch):
    from facevid.engine import requested_engine

    assert requested_engine() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RuntimeError, match="fsdp_version: 2"):
        requested_engine()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert requested_engine() == "fsdp2"


# ----------------------------------------------------------------------------------- accelerate launch
@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("synth"), num_clips=12, num_frames=8, resolution=32, fps=8.0,
                          seed=1, progress=False)


@pytest.fixture(scope="module")
def tiny_vae(synth_manifest, tmp_path_factory):
    return train_tiny_vae(synth_manifest, tmp_path_factory.mktemp("vae_run"), steps=2)


def launch(accelerate_config: Path, run: Path, manifest: Path, vae: Path, *overrides: str) -> str:
    """`accelerate launch train.py` on two CPU ranks, as a user would; returns the log."""
    cmd = ["timeout", "-k", "10", "170", sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(accelerate_config), "--main_process_port", str(free_port()), str(REPO / "train.py"),
           "--config", str(REPO / "configs/demo.yaml"), f"output_dir={run}", f"data.manifest={manifest}",
           f"vae.pretrained={vae}", "train.validate_every=0", "train.lr_scheduler=constant_with_warmup",
           "train.validation_prompts=[a person talking]",
           *[o for o in TINY if not o.startswith("train.validation_prompts")], *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def split_over_ranks(dcp_folder: Path) -> dict[str, int]:
    """For each tensor in a torch distributed checkpoint: how many ranks' pieces it was saved from."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(dcp_folder)).read_metadata()
    return {key: len(item.chunks) for key, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


@pytest.fixture(scope="module")
def fsdp2_run(synth_manifest, tiny_vae, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp2") / "straight"
    log = launch(FSDP2_CPU, run, synth_manifest, tiny_vae, "train.max_steps=4", "train.replica_check_every=2")
    return run, log


def test_fsdp2_launch_trains_sharded_and_saves_consolidated_weights(fsdp2_run):
    run, log = fsdp2_run
    assert "on 2 process(es), engine fsdp2" in log and "FSDP2 on 2 ranks: 10 FSDP units" in log
    assert "replica check skipped: fsdp2 shards the weights" in log
    assert sorted(losses(run)) == [1, 2, 3, 4]
    checkpoint = list_checkpoints(run)[-1]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4
    # Model, AdamW state and EMA were written as shards: the weight matrices come in one piece per rank.
    for folder in ("pytorch_model_fsdp_0", "optimizer_0", "ema_shards"):
        pieces = split_over_ranks(checkpoint / folder)
        weights = [k for k in pieces if "conv_in.weight" in k and not k.endswith(".step")]
        assert weights and all(pieces[k] == 2 for k in weights), (folder, pieces)
    # The final folders are ordinary save_pretrained weights: full tensors, loadable without any engine.
    unet, ema = (FaceVidUNet3D.from_pretrained(run / name) for name in ("unet", "unet_ema"))
    assert unet.config.block_out_channels == [32, 32] or tuple(unet.config.block_out_channels) == (32, 32)
    full = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert full["conv_in.weight"].shape == unet.conv_in.weight.shape
    assert not torch.equal(unet.conv_in.weight, ema.conv_in.weight)  # the EMA is its own average
    assert list((run / "samples").rglob("*.mp4"))


@pytest.mark.slow  # two more launches (~50 s); the engine-level resume test above is the fast one
def test_fsdp2_launch_resumes_bit_identically(fsdp2_run, synth_manifest, tiny_vae, tmp_path):
    """2 steps, then resume for 2 more == 4 uninterrupted: same losses, bit-identical weights and EMA."""
    straight, _ = fsdp2_run
    run = tmp_path / "resumed"
    launch(FSDP2_CPU, run, synth_manifest, tiny_vae, "train.max_steps=2")
    log = launch(FSDP2_CPU, run, synth_manifest, tiny_vae, "train.max_steps=4", "resume=latest")
    assert "resuming from" in log and "engine fsdp2" in log
    assert losses(run) == losses(straight)
    for folder in ("unet", "unet_ema"):
        a = load_file(straight / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(run / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


@pytest.mark.slow
def test_fsdp2_and_ddp_train_the_same_model(fsdp2_run, synth_manifest, tiny_vae, tmp_path):
    """Sharding changes where the numbers live, not what is learnt: DDP's losses match to float rounding."""
    straight, _ = fsdp2_run
    run = tmp_path / "ddp"
    launch(DDP_CPU, run, synth_manifest, tiny_vae, "train.max_steps=4")
    fsdp, ddp = losses(straight), losses(run)
    assert fsdp.keys() == ddp.keys() and all(abs(fsdp[s] - ddp[s]) <= 1e-5 * abs(ddp[s]) for s in ddp)
