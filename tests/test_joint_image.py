"""Joint image + video training (data.image_batch_share): still-image manifest entries, image batches that
train only the UNet's spatial layers, the same kind of batch on every rank, exact resume. Real PNG files, real
FaceVid-Synth mp4 clips, the production Trainer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import assert_same_weights, demo_overrides, launch_demo, logged_steps, train_straight_and_resumed
from safetensors.torch import load_file
from tiny import tiny_config, train_tiny_vae

from data import synth
from data.cache import LatentCache
from data.dataset import CachedJointDataset, JointImageVideoDataset, collate_joint
from data.manifest import read_manifest
from data.sampler import JointBatchSampler
from data.video import read_frames
from facevid.config import load_config
from facevid.schema import ConfigError
from facevid.stages import TextToVideoStage
from facevid.trainable import is_temporal
from facevid.trainer import Trainer
from models.unet3d import FaceVidUNet3D

REPO = Path(__file__).resolve().parents[1]


def still_image(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    """uint8 (H, W, 3): a smooth colour ramp (survives resizing) that differs per seed."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    colour = np.stack([40 + 150 * x, 60 + 100 * y + 10 * seed, 200 - 120 * x * y], axis=-1)
    return np.clip(colour, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def joint_manifest(tmp_path_factory):
    """8 FaceVid-Synth clips plus 4 still PNG images (two as "image", two as a "video" path ending in .png)."""
    out = tmp_path_factory.mktemp("joint")
    manifest = synth.generate(out, num_clips=8, num_frames=8, resolution=32, fps=8.0, seed=2, progress=False)
    lines = manifest.read_text().splitlines()
    for i in range(4):
        Image.fromarray(still_image(i)).save(out / f"face_{i}.png")
        lines.append(json.dumps({"id": f"face_{i}", "image" if i < 2 else "video": f"face_{i}.png",
                                 "caption": f"a still portrait number {i}"}))
    joint = out / "joint.jsonl"
    joint.write_text("\n".join(lines) + "\n")
    return joint


@pytest.fixture(scope="module")
def vae(joint_manifest, tmp_path_factory):
    return train_tiny_vae(joint_manifest.parent / "manifest.jsonl", tmp_path_factory.mktemp("vae"), steps=1)


# ----------------------------------------------------------------------------- manifest and dataset


def test_image_entries_are_read_and_decoded(joint_manifest):
    records, skipped = read_manifest(joint_manifest)
    assert not skipped and len(records) == 12
    images = [r for r in records if r.is_image]
    assert [r.clip_id for r in images] == ["face_0", "face_1", "face_2", "face_3"]
    assert images[0].to_json(joint_manifest.parent)["image"] == "face_0.png"

    dataset = JointImageVideoDataset(records, num_frames=4, resolution=16, seed=0)
    item = dataset[(8, True)]  # face_0.png: 40x48, centre-cropped to 40x40, resized to 16x16
    assert item["pixel_values"].shape == (3, 1, 16, 16) and item["clip_id"] == "face_0" and item["image"]
    assert item["caption"] == "a still portrait number 0" and not item["skipped"]
    expected = torch.from_numpy(still_image(0)[:, 4:44]).permute(2, 0, 1)[None].float()
    expected = torch.nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", antialias=True)
    assert torch.allclose((item["pixel_values"][:, 0] + 1) * 127.5, expected[0], atol=1.0)

    video = dataset[(0, False)]
    assert video["pixel_values"].shape == (3, 4, 16, 16) and not video["image"]
    # A video item asked for at an image entry is passed to the next clip, silently (not reported as skipped).
    records_reordered = [records[8]] + records[:8]
    item = JointImageVideoDataset(records_reordered, num_frames=4, resolution=16)[(0, False)]
    assert item["clip_id"] == records[0].clip_id and not item["skipped"]

    batch = collate_joint([dataset[(8, True)], dataset[(9, True)]])
    assert batch["image_batch"] is True and batch["pixel_values"].shape == (2, 3, 1, 16, 16)
    with pytest.raises(ValueError, match="mixes still images and video clips"):
        collate_joint([dataset[(8, True)], dataset[(0, False)]])


def test_image_item_from_a_clip_is_one_of_its_real_frames(joint_manifest):
    records = [r for r in read_manifest(joint_manifest)[0] if not r.is_image]
    dataset = JointImageVideoDataset(records, num_frames=4, resolution=32, seed=5)
    item = dataset[(3, True)]
    frame = ((item["pixel_values"][:, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    every_frame = read_frames(records[3].video, range(8), 32)
    assert any(np.array_equal(frame, f) for f in every_frame)


def test_manifest_refuses_a_bad_image_entry(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.mp4", "caption": "x"}) + "\n"
        + json.dumps({"image": "b.png", "video": "b.mp4", "caption": "x"}) + "\n")
    records, skipped = read_manifest(tmp_path / "m.jsonl", check_files=False)
    assert not records
    assert "is not an image file" in skipped[0].reason and "both 'video' and 'image'" in skipped[1].reason


# ----------------------------------------------------------------------------- sampler


def test_joint_sampler_same_kind_on_every_rank_and_exact_resume():
    videos, images = list(range(20)), list(range(20, 30))

    def ranks(share, epoch=0, start=0):
        out = []
        for rank in range(2):
            sampler = JointBatchSampler(videos, images, 2, share, num_replicas=2, rank=rank, seed=7)
            sampler.set_epoch(epoch, start_batch=start)
            out.append(list(sampler))
        return out

    a, b = ranks(0.4)
    assert len(a) == len(b) == round(5 / 0.6)  # 5 global video batches, ~40% more steps of images
    kinds = [{image for _, image in batch} for batch in a]
    assert all(len(k) == 1 for k in kinds)  # never a mixed batch
    assert kinds == [{image for _, image in batch} for batch in b]  # both ranks: the same kind each step
    assert {True} in kinds and {False} in kinds
    for x, y in zip(a, b):
        assert not {i for i, _ in x} & {i for i, _ in y}  # the two ranks' shares of a step differ
        assert all((i >= 20) == image for i, image in x + y)  # images from images, windows from videos
    assert ranks(0.4, start=3)[0] == a[3:]  # resume mid-epoch: the same remaining batches
    assert ranks(0.4, epoch=1)[0] != a
    assert all(image for batch in ranks(1.0)[0] for _, image in batch)
    assert not any(image for batch in ranks(0.0)[0] for _, image in batch)
    with pytest.raises(ValueError, match="no video clip"):
        JointBatchSampler([], images, 2, 0.5)


# ----------------------------------------------------------------------------- the UNet's spatial-only path


def test_temporal_false_skips_the_temporal_layers_which_are_not_the_identity_at_one_frame():
    torch.manual_seed(0)
    unet = FaceVidUNet3D(in_channels=4, out_channels=4, block_out_channels=(32, 32), attention_levels=(False, True),
                         attention_head_dim=16, cross_attention_dim=8, norm_num_groups=32, temporal_conv=True)
    with torch.no_grad():  # trained temporal layers: their zero-initialised output projections no longer zero
        for name, param in unet.named_parameters():
            if is_temporal(name):
                param.add_(0.05 * torch.randn_like(param))
    sample, text = torch.randn(2, 4, 1, 8, 8), torch.randn(2, 3, 8)
    spatial_only = unet(sample, 10, text, temporal=False)
    assert not torch.allclose(spatial_only, unet(sample, 10, text))  # at F=1 the temporal layers still act
    spatial_only.square().mean().backward()
    temporal = {n: p.grad for n, p in unet.named_parameters() if is_temporal(n)}
    assert temporal and all(g is None for g in temporal.values())
    assert all(p.grad is not None for n, p in unet.named_parameters() if not is_temporal(n))


# ----------------------------------------------------------------------------- training


class _RecordingStage(TextToVideoStage):
    """Keeps a copy of the freshly built UNet's weights (what step 1 starts from)."""

    def build(self, accelerator, dataset):
        unet = super().build(accelerator, dataset)
        self.initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        return unet


def test_image_only_step_updates_spatial_weights_and_leaves_temporal_ones_bit_identical(joint_manifest, vae,
                                                                                      tmp_path):
    cfg = tiny_config(joint_manifest, tmp_path / "run", "train.max_steps=1", "train.ema_decay=null",
                      "data.image_batch_share=1.0", "train.lr_warmup_steps=0", "train.weight_decay=0.01",
                      vae=vae)
    stage = _RecordingStage(cfg)
    Trainer(cfg, stage).fit()
    assert logged_steps(tmp_path / "run")[1]["image_batch"] == 1.0
    after = load_file(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors")
    temporal = [k for k in after if is_temporal(k)]
    spatial = [k for k in after if not is_temporal(k) and k in stage.initial]
    assert temporal and spatial
    assert all(torch.equal(after[k], stage.initial[k]) for k in temporal)  # weight decay did not touch them
    changed = [k for k in spatial if not torch.equal(after[k], stage.initial[k])]
    assert len(changed) > 0.9 * len(spatial)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_joint_training_mixes_batch_kinds_and_resumes_exactly(joint_manifest, vae, tmp_path, accumulation):
    """8 clips + 4 images at batch 2, share 0.5: 8 micro-batches an epoch. N steps straight == 3 steps, SIGTERM,
    the rest resumed; the resumed part crosses an epoch boundary."""
    steps = 10 // accumulation
    common = [f"train.max_steps={steps}", "data.image_batch_share=0.5", "data.num_workers=1",
              f"train.gradient_accumulation_steps={accumulation}"]
    straight, resumed = train_straight_and_resumed(
        lambda run, *extra: tiny_config(joint_manifest, run, *common, *extra, vae=vae), tmp_path, stop_at_step=3)
    logged = logged_steps(straight)
    kinds = [logged[s]["image_batch"] for s in sorted(logged)]
    assert sorted(logged) == list(range(1, steps + 1))
    if accumulation == 1:  # `image_batch` is the kind of a step's last micro-batch
        assert 0.0 in kinds and 1.0 in kinds

    assert {s: (r["loss"], r["image_batch"]) for s, r in logged.items()} == \
           {s: (r["loss"], r["image_batch"]) for s, r in logged_steps(resumed).items()}
    assert_same_weights(straight, resumed)


def test_still_images_without_image_batches_are_left_out(joint_manifest, vae, tmp_path, caplog):
    cfg = tiny_config(joint_manifest, tmp_path / "run", "train.max_steps=1", "train.validate_every=0", vae=vae)
    trainer = Trainer(cfg, TextToVideoStage(cfg))
    trainer.fit()
    assert "4 still image(s)" in caplog.text and "data.image_batch_share > 0" in caplog.text
    assert len(trainer.dataset) == 8 and not (tmp_path / "run" / "skipped_clips.jsonl").exists()


def test_cached_joint_training_stores_images_as_one_frame_windows(joint_manifest, vae, tmp_path):
    cache_dir = tmp_path / "cache"
    cfg = tiny_config(joint_manifest, tmp_path / "run", "train.max_steps=6", "train.validate_every=0",
                      "data.image_batch_share=0.5", "data.cache=auto", f"data.cache_dir={cache_dir}", vae=vae)
    trainer = Trainer(cfg, TextToVideoStage(cfg))
    trainer.fit()
    assert isinstance(trainer.dataset, CachedJointDataset) and len(trainer.dataset) == 12
    kinds = [r["image_batch"] for r in logged_steps(tmp_path / "run").values()]
    assert 0.0 in kinds and 1.0 in kinds
    cache = LatentCache(cache_dir)
    assert cache.windows["face_0"] == cache.windows["face_3"] == [(0, 0)]  # one 1-frame window, no flip
    assert cache.latent("face_0", 0, 0)[0].shape == (4, 1, 8, 8)
    clips = [r for r in read_manifest(joint_manifest)[0] if not r.is_image]
    assert all(len(cache.windows[r.clip_id]) == 4 and cache.latent(r.clip_id, 0, 0)[0].shape == (4, 4, 8, 8)
               for r in clips)

    # No image entries: an image item is one frame of one of the clip's cached windows.
    dataset = CachedJointDataset(clips, cache, trainer.dataset.text_key, seed=3)
    item = dataset[(2, True)]
    assert item["image"] and item["latent_mean"].shape == (4, 1, 8, 8)
    windows = [cache.latent(clips[2].clip_id, start, 0)[0] for start, _ in cache.windows[clips[2].clip_id]]
    assert any(torch.equal(item["latent_mean"][:, 0], w[:, f]) for w in windows for f in range(4))


@pytest.mark.parametrize("override, message", [
    ("data.image_batch_share=1.5", "must be in [0, 1]"),
    ("task=i2v", "stage t2v for task t2v or uncond"),
    ("train.trainable=temporal", "train.trainable=temporal"),
])
def test_config_refuses_unsupported_image_batch_setups(joint_manifest, vae, tmp_path, override, message):
    share = [] if "image_batch_share" in override else ["data.image_batch_share=0.25"]
    with pytest.raises(ConfigError, match="data.image_batch_share") as err:
        tiny_config(joint_manifest, tmp_path / "run", *share, override, vae=vae)
    assert message in str(err.value)


@pytest.mark.slow
def test_two_rank_ddp_mixing_image_and_video_batches(joint_manifest, vae, tmp_path):
    """Real 2-rank gloo DDP switching between image and video steps: DDP runs with find_unused_parameters (without
    it the step after an image step fails) and the replicas stay identical every step."""
    run = tmp_path / "ddp"
    log = launch_demo("cpu_2proc.yaml", joint_manifest, vae, run, "train.max_steps=4", "data.image_batch_share=0.5")
    assert "on 2 process(es), engine ddp" in log
    for step in range(1, 5):
        assert f"step {step}: weights identical on all 2 rank(s)" in log
    kinds = [r["image_batch"] for r in logged_steps(run).values()]
    assert 0.0 in kinds and 1.0 in kinds


@pytest.mark.slow
@pytest.mark.parametrize("engine, launch_config", [("ddp", "cpu_2proc.yaml"), ("fsdp2", "fsdp2_2proc_cpu.yaml")])
def test_two_rank_image_steps_leave_temporal_weights_untouched(joint_manifest, vae, tmp_path, engine,
                                                               launch_config):
    """2 image-only steps on 2 ranks (DDP, or FSDP2 shards): the temporal weights are still bit-identical to the
    initial ones (recorded by a one-process run of the same seed), the spatial ones trained."""
    cfg = load_config(REPO / "configs/demo.yaml", demo_overrides(joint_manifest, vae, tmp_path / "one",
                                                                "train.max_steps=1", "data.image_batch_share=1.0"))
    stage = _RecordingStage(cfg)
    Trainer(cfg, stage).fit()
    run = tmp_path / engine
    log = launch_demo(launch_config, joint_manifest, vae, run, "train.max_steps=2", "data.image_batch_share=1.0")
    assert f"on 2 process(es), engine {engine}" in log
    after = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    temporal = [k for k in after if is_temporal(k)]
    spatial = [k for k in after if not is_temporal(k) and k in stage.initial]
    assert temporal and all(torch.equal(after[k], stage.initial[k]) for k in temporal)
    assert sum(not torch.equal(after[k], stage.initial[k]) for k in spatial) > 0.9 * len(spatial)
