"""The training loop when things go wrong: a loss that turns NaN, a full disk, a killed run, frozen parameters.

Every run is a tiny real one through the production Trainer (tests/tiny.py); failures are injected at the
boundary where they happen in production (the loss a stage returns, torch.save writing a file)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from task_runs import entry_point, random_vae, synth_manifest
from tiny import TINY, tiny_config

from data.video import probe_video
from facevid.checkpoints import CheckpointWriteError, list_checkpoints
from facevid.health import NonFiniteLossError, weights_checksum
from facevid.stages import TextToVideoStage
from facevid.stages.common import frozen_weight_dtype, training_fps
from facevid.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return synth_manifest(tmp_path_factory)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return random_vae(tmp_path_factory)


def run_config(manifest, vae, out, *overrides):
    return tiny_config(manifest, out, "sample.num_inference_steps=2", "train.validate_every=0", *overrides, vae=vae)


def fit(cfg, stage=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and fair to other processes
    try:
        return Trainer(cfg, stage or TextToVideoStage(cfg)).fit()
    finally:
        torch.set_num_threads(threads)


def metric_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


class _InjectedStage(TextToVideoStage):
    """The real stage, with something injected at chosen micro-batches (1-based): a NaN loss, or a crash."""

    def __init__(self, cfg, nan_at=(), crash_at=None):
        super().__init__(cfg)
        self.calls, self.nan_at, self.crash_at = 0, set(nan_at), crash_at

    def compute_loss(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated kill")  # as abrupt as kill -9 for what is on disk
        loss, logs = super().compute_loss(model, batch, generator)
        if self.calls in self.nan_at:
            loss = loss * float("nan")  # NaN that flows through backward into every gradient
        return loss, logs


# ------------------------------------------------------------------ 6. a loss that turns NaN
def test_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(manifest, vae, tmp_path):
    run = tmp_path / "nan"
    cfg = run_config(manifest, vae, run, "train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(NonFiniteLossError) as caught:
        fit(cfg, _InjectedStage(cfg, nan_at={5}))
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again after the failed run
    message = str(caught.value)
    assert "step 5" in message and "step-00000004" in message and "resume=latest" in message
    assert "train.learning_rate" in message
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]  # never rotated away, nothing newer
    assert all_finite(checkpoint_weights(list_checkpoints(run)[0]))
    assert not (run / "unet").exists()  # no final weights from a failed run


def test_huge_learning_rate_fails_loudly_with_only_finite_checkpoints(manifest, vae, tmp_path):
    """lr 1e6 blows the weights up within a few steps: the run must stop, not train on NaN to the end."""
    run = tmp_path / "lr"
    cfg = run_config(manifest, vae, run, "train.max_steps=30", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                     "train.learning_rate=1e6", "train.lr_warmup_steps=0")
    with pytest.raises(NonFiniteLossError, match="resume=latest"):
        fit(cfg)
    kept = list_checkpoints(run)
    assert all(all_finite(checkpoint_weights(c)) for c in kept)
    assert not (run / "unet").exists()


def test_train_cli_exits_non_zero_with_the_message(manifest, vae, tmp_path, capsys):
    run = tmp_path / "cli"
    overrides = [f"output_dir={run}", f"data.manifest={manifest}", f"vae.pretrained={vae}", "train.max_steps=20",
                 "train.learning_rate=1e6", "train.lr_warmup_steps=0", "train.validate_every=0",
                 "train.validation_prompts=[a person talking]",
                 *[o for o in TINY if not o.startswith(("train.validation_prompts", "train.learning_rate"))]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = entry_point("train").main(["--config", str(REPO / "configs" / "demo.yaml"), *overrides])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 1 and "error: step" in err and "not finite" in err and "Traceback" not in err


@pytest.mark.parametrize("accumulation", [1, 2])
def test_nonfinite_steps_within_the_budget_are_skipped(manifest, vae, tmp_path, accumulation):
    run = tmp_path / "skip"
    cfg = run_config(manifest, vae, run, "train.max_steps=4", "train.max_nonfinite_steps=1",
                     f"train.gradient_accumulation_steps={accumulation}")
    stage = _InjectedStage(cfg, nan_at={accumulation + 1})  # the first micro-batch of step 2
    fit(cfg, stage)
    rows = {row["step"]: row for row in metric_rows(run) if "loss" in row}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[2]["nonfinite_steps"] == 1 and "nonfinite_steps" not in rows[3]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows.values() if row["step"] != 2)
    unet = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert all_finite(unet)


def test_nonfinite_weights_are_never_checkpointed(manifest, vae, tmp_path):
    """Finite gradients can still push the weights past the float range (e.g. lr x weight decay > 2):
    the check before every save catches what the gradient check cannot."""

    class _BlowUp(TextToVideoStage):
        def compute_loss(self, model, batch, generator):
            loss, logs = super().compute_loss(model, batch, generator)
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))  # after this forward: gradients stay finite
            return loss, logs

    run = tmp_path / "inf"
    cfg = run_config(manifest, vae, run, "train.max_steps=1")
    with pytest.raises(NonFiniteLossError, match="not finite"):
        fit(cfg, _BlowUp(cfg))
    assert list_checkpoints(run) == []


# ------------------------------------------------------------------ 7. a checkpoint that cannot be written
def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_leaves_no_partial_folder(manifest, vae, tmp_path,
                                                                                       monkeypatch):
    run = tmp_path / "full"
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if ".tmp-step-00000004" in str(f):
            with open(f, "wb") as handle:  # a partial file, as a real full disk leaves
                handle.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    cfg = run_config(manifest, vae, run, "train.max_steps=6", "train.checkpoint_every=2")
    with pytest.raises(CheckpointWriteError) as caught:
        fit(cfg)
    message = str(caught.value)
    assert "checkpoint at step 4 could not be written to" in message and "disk full?" in message
    assert "No space left on device" in message and "step-00000002 is intact" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no .tmp- folder left
    assert all_finite(checkpoint_weights(run / "checkpoints" / "step-00000002"))


def test_stale_partial_checkpoints_are_removed_at_start_up(manifest, vae, tmp_path, caplog):
    run = tmp_path / "stale"
    stale = run / "checkpoints" / ".tmp-step-00000007"  # what kill -9 in the middle of a save leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    cfg = run_config(manifest, vae, run, "train.max_steps=1")
    with caplog.at_level(logging.WARNING, logger="facevid"):
        fit(cfg)
    assert not stale.exists()
    assert "removed a partial checkpoint" in caplog.text
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]


# ------------------------------------------------------------------ metrics after a kill and resume
def test_resume_after_a_kill_does_not_repeat_metrics_rows(manifest, vae, tmp_path):
    run = tmp_path / "killed"
    common = ("train.max_steps=5", "train.checkpoint_every=2")
    cfg = run_config(manifest, vae, run, *common)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, _InjectedStage(cfg, crash_at=4))  # steps 1-3 logged, checkpoint at 2
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    with open(run / "skipped_clips.jsonl", "w") as handle:  # one report before the checkpoint, one after
        for step in (2, 3):
            handle.write(json.dumps({"step": step, "epoch": 0, "video": f"v{step}.mp4", "reason": "corrupt"}) + "\n")

    fit(run_config(manifest, vae, run, *common, "resume=latest"))
    steps = [r["step"] for r in metric_rows(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # step 3 logged once, by the resumed run
    assert [json.loads(line)["step"] for line in (run / "skipped_clips.jsonl").read_text().splitlines()] == [2]


# ------------------------------------------------------------------ frozen text encoder / VAE dtype
@pytest.mark.parametrize(("precision", "expected"), [("no", torch.float32), ("bf16", torch.bfloat16),
                                                     ("fp16", torch.float16)])
def test_frozen_modules_follow_the_mixed_precision(precision, expected):
    assert frozen_weight_dtype(precision) == expected


def test_stage_casts_the_frozen_text_encoder_and_vae(manifest, vae, tmp_path):
    from data.dataset import VideoClipDataset
    from data.manifest import read_manifest

    cfg = run_config(manifest, vae, tmp_path / "dtype", "train.mixed_precision=bf16")
    records, _ = read_manifest(manifest)
    dataset = VideoClipDataset(records, num_frames=4, resolution=16)
    stage = TextToVideoStage(cfg)
    # What build() reads of the Accelerator (a second real one with another precision cannot exist in-process).
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16", is_main_process=True)
    unet = stage.build(accelerator, dataset)
    assert next(stage.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(stage.vae.parameters()).dtype == torch.bfloat16
    assert next(unet.parameters()).dtype == torch.float32  # trained weights stay fp32 under autocast


# ------------------------------------------------------------------ EMA with frozen parameters
class _PartlyFrozenStage(TextToVideoStage):
    """Freezes the input convolution and the first down level, and remembers their initial weights."""

    frozen_prefixes = ("conv_in.", "time_embedding.", "down_layers.0.")

    def build(self, accelerator, dataset):
        unet = super().build(accelerator, dataset)
        for name, param in unet.named_parameters():
            if name.startswith(self.frozen_prefixes):
                param.requires_grad_(False)
        self.initial = {k: v.clone() for k, v in unet.state_dict().items()}
        self.trainable = [name for name, param in unet.named_parameters() if param.requires_grad]
        return unet


def test_ema_with_frozen_parameters(manifest, vae, tmp_path):
    run = tmp_path / "frozen"
    # The trainer freezes by config (train.trainable_exclude); the stage freezes the same names and records them.
    exclude = ",".join(f"{prefix}*" for prefix in _PartlyFrozenStage.frozen_prefixes)
    cfg = run_config(manifest, vae, run, "train.max_steps=3", "train.validate_every=2",
                     f"train.trainable_exclude=[{exclude}]")
    stage = _PartlyFrozenStage(cfg)
    fit(cfg, stage)
    unet = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(run / "unet_ema" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in unet if k.startswith(stage.frozen_prefixes)]
    trainable = stage.trainable  # in the model's parameter order, the EMA's
    assert frozen and trainable and not set(frozen) & set(trainable)
    for key in frozen:  # bit-identical to the initial weights, in both the trained and the EMA weights
        assert torch.equal(unet[key], stage.initial[key]) and torch.equal(ema[key], stage.initial[key]), key
    # The EMA of the trainable parameters: the shadow parameters saved in the last checkpoint, in order.
    shadow = torch.load(list_checkpoints(run)[-1] / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"]
    assert len(shadow) == len(trainable)
    for key, average in zip(trainable, shadow):
        assert torch.equal(ema[key], average), key
    assert any(not torch.equal(ema[k], unet[k]) for k in trainable)  # the average, not the last weights


# ------------------------------------------------------------------ replica checksum
def test_weights_checksum_matches_float64_and_sees_one_changed_value():
    torch.manual_seed(0)
    params = [torch.randn(300, 7), torch.randn(5).to(torch.bfloat16), torch.randn(1000)]
    flat = torch.cat([p.double().flatten() for p in params])
    expected = torch.stack([flat.sum(), (flat**2).sum()])
    before = weights_checksum(params, chunk=64)
    assert before.dtype == torch.float64 and torch.allclose(before, expected, rtol=1e-12, atol=0)
    params[2][17] += 1e-3
    assert not torch.equal(weights_checksum(params, chunk=64), before)


def test_weights_checksum_never_holds_a_float64_copy_of_a_whole_parameter():
    big = torch.randn(1 << 20)  # 4 MB in fp32, 8 MB as float64
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        weights_checksum([big], chunk=1 << 14)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert 0 < largest < big.numel() * 8 // 4, largest


# ------------------------------------------------------------------ 5. playback fps
def test_training_fps(manifest, vae, tmp_path):
    def fps(*overrides, records=None):
        return training_fps(run_config(manifest, vae, tmp_path, *overrides), records)

    from data.manifest import read_manifest

    records, _ = read_manifest(manifest)  # FaceVid-Synth at 8 fps
    assert fps("data.frame_stride=2", records=records) == 4.0
    assert fps("data.target_fps=6.25", "data.frame_stride=2", records=records) == 6.25
    assert fps("data.frame_stride=2", "sample.fps=10", records=records) == 10.0  # explicit wins
    unknown = [dataclasses.replace(r, fps=None, video=str(tmp_path / "missing.mp4")) for r in records]
    assert fps(records=unknown) == 8.0


def test_validation_videos_play_at_the_training_fps(manifest, vae, tmp_path):
    run = tmp_path / "fps"
    cfg = run_config(manifest, vae, run, "train.max_steps=1", "data.frame_stride=2")
    assert cfg.sample.fps is None  # the default: the fps the model is trained at
    fit(cfg)
    videos = sorted((run / "samples").rglob("*.mp4"))
    assert videos and probe_video(videos[0]).fps == pytest.approx(4.0)  # 8 fps clips, every 2nd frame
    saved = (run / "config.yaml").read_text()
    assert "fps: 4.0" in saved  # sample.py plays at the same speed

    # A config without the resolved value (written by hand, say): sample.py works it out from the manifest.
    (run / "config.yaml").write_text(saved.replace("fps: 4.0", "fps: null"))
    out = tmp_path / "cli"
    assert entry_point("sample").main(["--run", str(run), "--prompt", "a person talking", "--steps", "1",
                                       "--out", str(out)]) == 0
    assert probe_video(next(out.glob("*.mp4"))).fps == pytest.approx(4.0)


# ------------------------------------------------------------------ failures on one rank of two
@pytest.mark.slow  # ~20 s each: two processes start and train
@pytest.mark.parametrize(("mode", "error"), [("nan", "NonFiniteLossError: step 3:"),
                                                     ("disk", "CheckpointWriteError: checkpoint at step 4")])
def test_a_failure_on_one_rank_stops_every_rank(manifest, vae, tmp_path, mode, error):
    """Rank 1 alone sees the NaN / the full disk; both ranks must stop with the error instead of one waiting
    forever in a collective for the other."""
    run = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "two_rank_failures.py"), mode, str(manifest), str(vae), str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"rank 0 stopped: {error}" in log and f"rank 1 stopped: {error}" in log, log[-4000:]
    assert "step-00000002 is intact" in log if mode == "disk" else "resume=latest" in log
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert all_finite(checkpoint_weights(list_checkpoints(run)[0]))
