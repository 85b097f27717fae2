"""The training input pipeline: persistent DataLoader workers that still see every epoch, the loader options
(config keys, validated), the foreach EMA, start-up checks done on rank 0 only and the bucket plan reused."""

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from diffusers.training_utils import EMAModel

from data.buckets import bucketed_training_data, parse_buckets, saved_or_new_plan
from data.dataset import VideoClipDataset, collate_clips
from data.manifest import ClipRecord
from data.sampler import EpochKey, ShardedEpochSampler, training_loader
from data.video import probe_video
from facevid.config import ConfigError, load_config, validate
from facevid.ema import new_ema
from facevid.engine import on_main_process


@pytest.fixture
def clips(make_video):
    """Six 24-frame clips: a 4-frame window has 21 possible starts, so the epochs' windows differ."""
    return [ClipRecord(clip_id=f"c{i}", video=str(make_video(f"c{i}.mp4", num_frames=24, height=16, width=16)[0]),
                       captions=[f"caption {i}"]) for i in range(6)]


def test_persistent_workers_see_each_epoch(clips):
    """Two persistent workers over three epochs: every item is the one the dataset builds for (epoch, index),
    although the workers' dataset copies were made at epoch 0 and never told of set_epoch."""
    dataset = VideoClipDataset(clips, num_frames=4, resolution=16, seed=3)
    sampler = ShardedEpochSampler(len(dataset), batch_size=2, seed=3)
    loader = training_loader(dataset, sampler, collate_clips, batch_size=2, num_workers=2, persistent_workers=True,
                             prefetch_factor=1, seed=3)
    seen, workers = {}, []
    for epoch in range(3):
        sampler.set_epoch(epoch)  # dataset.set_epoch deliberately NOT called: only the keys carry the epoch
        for batch in loader:
            for index, pixels in zip(batch["index"], batch["pixel_values"]):
                seen[epoch, index] = pixels
        workers.append([w.pid for w in loader._iterator._workers])
    assert workers[0] == workers[1] == workers[2] and len(workers[0]) == 2  # the same two processes throughout
    assert len(seen) == 3 * len(clips)
    for (epoch, index), pixels in seen.items():
        assert torch.equal(pixels, dataset[EpochKey(epoch, index)]["pixel_values"]), (epoch, index)
    # The epoch really changes the windows (else this test could not tell a stale epoch from a fresh one).
    assert any(not torch.equal(seen[0, i], seen[1, i]) for i in range(len(clips)))
    loader._iterator._shutdown_workers()


def test_epoch_key_and_set_epoch_agree(clips):
    dataset = VideoClipDataset(clips, num_frames=4, resolution=16, seed=3)
    dataset.set_epoch(2)
    assert torch.equal(dataset[1]["pixel_values"], dataset[EpochKey(2, 1)]["pixel_values"])


def test_loader_options_reach_the_dataloader(clips):
    dataset = VideoClipDataset(clips, num_frames=4, resolution=16)
    sampler = ShardedEpochSampler(len(dataset), batch_size=2)
    loader = training_loader(dataset, sampler, collate_clips, 2, num_workers=1, persistent_workers=False,
                             prefetch_factor=3, pin_memory=False)
    assert (loader.persistent_workers, loader.prefetch_factor, loader.num_workers) == (False, 3, 1)
    without = training_loader(dataset, sampler, collate_clips, 2, num_workers=0, prefetch_factor=3)
    assert without.prefetch_factor is None and not without.persistent_workers  # torch refuses them without workers
    assert [len(b["index"]) for b in without] == [2, 2, 2]


@pytest.mark.parametrize("override, key", [("data.prefetch_factor=0", "data.prefetch_factor"),
                                           ("data.num_workers=-1", "data.num_workers")])
def test_loader_config_is_validated(tmp_path, override, key):
    cfg = load_config(None, ["stage=vae", f"output_dir={tmp_path}", f"data.manifest={tmp_path / 'm.jsonl'}",
                             override], validate_files=False)
    with pytest.raises(ConfigError, match=key):  # before any file is looked at
        validate(cfg)


def test_loader_config_defaults(tmp_path):
    cfg = load_config(None, ["stage=vae", f"output_dir={tmp_path}", f"data.manifest={tmp_path / 'm.jsonl'}"],
                      validate_files=False)
    assert (cfg.data.persistent_workers, cfg.data.prefetch_factor, cfg.data.pin_memory) == (True, None, None)


def test_foreach_ema_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    fast, slow = new_ema(params, 0.9), EMAModel(params, decay=0.9)
    assert fast.foreach and not slow.foreach
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        fast.step(params)
        slow.step(params)
    for a, b in zip(fast.shadow_params, slow.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fast.shadow_params[0], params[0])  # the average lags the weights: it did average
    state = fast.state_dict()
    slow.load_state_dict(state)  # one state-dict format: checkpoints load either way
    assert slow.optimization_step == fast.optimization_step == 3


# ------------------------------------------------------------------ start-up: probe once, share, reuse

def test_bucket_plan_is_reused_from_buckets_json_without_probing(clips, tmp_path):
    specs = ["4x16x16", "8x16x16"]
    buckets = parse_buckets(specs)
    _, _, report = bucketed_training_data(clips, specs, batch_size=2, num_replicas=1, rank=0, seed=0)
    saved = tmp_path / "buckets.json"
    saved.write_text(json.dumps(report, indent=2))

    def no_probe(path):
        raise AssertionError(f"probed {path} although the saved plan matches")

    plan, reused = saved_or_new_plan(saved, clips, buckets, probe=no_probe)
    assert reused and plan.bucket_of == report["bucket_of"] == [1] * len(clips)

    probed = []

    def counting_probe(path):
        probed.append(path)
        return probe_video(path)

    for changed in [dict(records=clips[:-1]), dict(buckets=buckets[:1]), dict(max_crop=0.1)]:
        args = {"records": clips, "buckets": buckets, **changed}
        plan, reused = saved_or_new_plan(saved, probe=counting_probe, **args)
        assert not reused and len(plan.bucket_of) == len(args["records"]), changed
    assert len(probed) == 2 * len(clips) + len(clips) - 1  # each changed setting re-probed every clip
    saved.write_text("{torn")
    assert not saved_or_new_plan(saved, clips, buckets)[1]  # a damaged file is re-planned, not trusted


def _probe_on_rank_zero(folder):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the fork inherits the test process's single-process state
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2

    def work():
        (Path(folder) / f"ran-on-{acc.process_index}").touch()
        return {"plan": [1, 2, 3], "by": acc.process_index}

    result = on_main_process(acc, work)
    (Path(folder) / f"result-{acc.process_index}.json").write_text(json.dumps(result))

    def failing():
        raise ConfigError("config key 'data.num_frames' = 99 is invalid: no clip is long enough")

    try:
        on_main_process(acc, failing)
    except ConfigError as err:
        (Path(folder) / f"error-{acc.process_index}.txt").write_text(str(err))


def test_start_up_probes_run_on_rank_zero_and_every_rank_gets_the_result_or_the_error(tmp_path):
    debug_launcher(_probe_on_rank_zero, args=(str(tmp_path),), num_processes=2)
    assert sorted(p.name for p in tmp_path.glob("ran-on-*")) == ["ran-on-0"]  # rank 1 did no work
    for rank in (0, 1):
        assert json.loads((tmp_path / f"result-{rank}.json").read_text()) == {"plan": [1, 2, 3], "by": 0}
        assert "data.num_frames" in (tmp_path / f"error-{rank}.txt").read_text()  # both ranks fail alike


# ------------------------------------------------------------------ host syncs in the training loop

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two tiny training runs, ~30 s
@pytest.mark.parametrize("stage", ["t2v", "vae"])
def test_no_host_sync_from_our_code_per_micro_step(tmp_path, monkeypatch, stage):
    """Reading a tensor on the host (.item(), bool(), float(), .tolist()) makes the host wait for the device. The
    project's own code may do it per optimizer step (the finiteness check) and per log interval, never per
    micro-step: 3 optimizer steps with 4 micro-steps each read exactly as often as with 1. The VAE stage runs
    with its random training crop (vae.train_crop)."""
    from tiny import tiny_config, train_tiny_vae

    from data import synth
    from facevid.stages import STAGES
    from facevid.trainer import Trainer

    manifest = synth.generate(tmp_path / "synth", num_clips=8, num_frames=8, resolution=32, fps=8.0, seed=1,
                              progress=False)
    vae = train_tiny_vae(manifest, tmp_path / "vae", steps=1)
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            # The project's code, not libraries (also not those of a .venv inside the checkout).
            if REPO in caller.parents and not {"tests", "site-packages"} & set(caller.parts):
                reads.append(f"{name} at {caller.relative_to(REPO)}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        counted(name)
    per_run = {}
    for accumulation in (1, 4):
        reads.clear()
        extra = ["vae.train_crop=8", "train.ema_decay=null"] if stage == "vae" else []
        cfg = tiny_config(manifest, tmp_path / f"run{accumulation}", "train.max_steps=3", "train.log_every=100",
                          f"train.gradient_accumulation_steps={accumulation}", *extra, stage=stage, vae=vae)
        Trainer(cfg, STAGES[stage](cfg)).fit()
        per_run[accumulation] = sorted(reads)
    assert per_run[1], "no read counted at all: the counting does not work"
    assert per_run[4] == per_run[1]
