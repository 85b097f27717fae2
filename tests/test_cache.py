"""The latent / text-embedding cache: format, fingerprint, resumable and multi-rank builds, and
training from it. Tiny FaceVid-Synth clips and a VAE trained for a few steps, through production code."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import TINY, tiny_config, train_tiny_vae

import cache as cache_script
import train as train_script
from data import cache as cache_module
from data import synth
from data.cache import CacheIndex, LatentCache, shard_files, text_key, write_fingerprint
from data.dataset import CachedClipDataset, VideoClipDataset, collate_clips
from data.manifest import read_manifest
from facevid import cache_builder
from facevid.cache_builder import build_cache, check_cache, expected_fingerprint
from facevid.config import load_config, save_config
from facevid.engine import build_accelerator
from facevid.schema import ConfigError
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer
from models.unet3d import FaceVidUNet3D
from models.vae import decode_latents, encode_video_posterior, load_vae

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    # 4-frame clips and 4-frame windows: one window per clip, so cached and on-the-fly training
    # see exactly the same frames.
    out = tmp_path_factory.mktemp("cache_synth")
    return synth.generate(out, num_clips=8, num_frames=4, resolution=16, fps=8.0, seed=3, progress=False)


@pytest.fixture(scope="module")
def vae_dir(clips, tmp_path_factory):
    return train_tiny_vae(clips, tmp_path_factory.mktemp("cache_vae"), steps=2)


def cache_config(clips, vae_dir, tmp_path, *extra):
    return tiny_config(clips, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}", "data.cache=auto",
                       "data.cache_shard_clips=2", *extra, vae=vae_dir)


def build(cfg):
    return build_cache(cfg, build_accelerator(cfg, Path(cfg.output_dir)))


def test_cached_latents_decode_back_to_the_frames(clips, vae_dir, tmp_path):
    cfg = cache_config(clips, vae_dir, tmp_path, "data.cache_dtype=fp32")
    report = build(cfg)
    assert report.clips_encoded == 8 and not report.skipped
    assert json.loads((tmp_path / "cache" / "report.json").read_text())["clips_encoded"] == 8
    cache = LatentCache(tmp_path / "cache")
    records, _ = read_manifest(clips)
    frames = VideoClipDataset(records, num_frames=4, resolution=16)[0]["pixel_values"][None]
    vae = load_vae(str(vae_dir))
    mean, std = encode_video_posterior(vae, frames)
    cached_mean, cached_std = cache.latent(records[0].clip_id, 0, 0)
    assert torch.allclose(cached_mean, mean[0], atol=1e-5) and torch.allclose(cached_std, std[0], atol=1e-5)
    scale = vae.config.scaling_factor
    from_cache = decode_latents(vae, cached_mean[None] * scale)
    direct = decode_latents(vae, mean * scale)
    assert (from_cache - direct).abs().max() < 1e-4  # the cache adds nothing to the VAE's own error
    # Every caption and the empty prompt (for caption dropout) are stored once.
    key = lambda p: text_key(p, cfg.text_encoder.pretrained, cfg.text_encoder.max_length)  # noqa: E731
    assert all(cache.has_text(key(c)) for r in records for c in r.captions) and cache.has_text(key(""))


def test_fp16_is_the_default_and_halves_the_bytes(clips, vae_dir, tmp_path):
    small = build(cache_config(clips, vae_dir, tmp_path / "a"))
    large = build(cache_config(clips, vae_dir, tmp_path / "b", "data.cache_dtype=fp32"))
    assert small.bytes_written < 0.6 * large.bytes_written


def test_fingerprint_mismatch_is_refused_with_the_field(clips, vae_dir, tmp_path, capsys):
    """Item 4: a stale cache is a clean error naming what differs and what to do, never a traceback."""
    build(cache_config(clips, vae_dir, tmp_path))
    other = cache_config(clips, vae_dir, tmp_path, "data.num_frames=2", "data.cache=use")
    with pytest.raises(ConfigError, match=r"num_frames: cache has 4, config needs 2(.|\n)*data.cache_dir"):
        Trainer(other, TextToVideoStage(other)).fit()
    with pytest.raises(ConfigError, match="dtype") as err:
        build(cache_config(clips, vae_dir, tmp_path, "data.cache_dtype=fp32"))
    assert "data.cache=auto" not in str(err.value)  # the setting that just failed is no fix
    # The entry points print the error and exit 2.
    save_config(other, tmp_path / "other.yaml")
    assert train_script.main(["--config", str(tmp_path / "other.yaml")]) == 2
    assert cache_script.main(["--config", str(tmp_path / "other.yaml")]) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and printed.count("num_frames: cache has 4, config needs 2") == 2


def test_failed_build_leaves_nothing_in_the_way(clips, vae_dir, tmp_path):
    """Item 3: a build that fails (or is killed) before its first shard must not block a corrected config."""
    import transformers as tf

    broken = tmp_path / "encoder"  # a text encoder whose weights file is cut short: the build fails loading it
    tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=64)).save_pretrained(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ|incomplete"):
        build(cache_config(clips, vae_dir, tmp_path, f"text_encoder.pretrained={broken}"))
    assert not (tmp_path / "cache" / "fingerprint.json").exists()
    assert build(cache_config(clips, vae_dir, tmp_path)).clips_encoded == 8
    # A build killed before any shard leaves its fingerprint and nothing else: also no obstacle.
    other = tmp_path / "killed"
    write_fingerprint(other / "cache", expected_fingerprint(cache_config(clips, vae_dir, other, "data.flip=true")))
    assert build(cache_config(clips, vae_dir, other)).clips_encoded == 8


def test_cache_files_respect_the_umask(clips, vae_dir, tmp_path):
    """Item 10: a cache shared on a cluster must be readable by the group (safetensors writes 0600)."""
    old = os.umask(0o022)
    try:
        build(cache_config(clips, vae_dir, tmp_path))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_interrupted_build_resumes_and_encodes_each_clip_once(clips, vae_dir, tmp_path, monkeypatch):
    cfg = cache_config(clips, vae_dir, tmp_path, "data.cache_encode_batch=2")
    calls = []
    real_read = cache_builder.read_frames

    def crash_on_fifth_clip(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a shard
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(cache_builder, "read_frames", crash_on_fifth_clip)
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    done = LatentCache(tmp_path / "cache")
    assert len(done.windows) == 4  # two complete shards of 2 clips; the half-filled one never appeared
    assert not list((tmp_path / "cache" / "shards").glob(".tmp-*"))
    # Item 4: data.cache=use refuses the half-built cache, saying so and how to finish it.
    save_config(cfg, tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=r"incomplete(.|\n)*cache.py --config(.|\n)*data.cache=auto"):
        load_config(tmp_path / "cfg.yaml", ["data.cache=use"])

    calls.clear()
    monkeypatch.setattr(cache_builder, "read_frames", lambda *a, **k: calls.append(a[0]) or real_read(*a, **k))
    report = build(cfg)
    assert (report.clips_already_cached, report.clips_encoded, len(calls)) == (4, 4, 4)
    names = []
    for shard in (tmp_path / "cache" / "shards").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            names += [n for n in handle.keys() if n.startswith("latent/")]
    assert len(names) == len(set(names)) == 8 * 2  # mean + std per clip, each stored exactly once
    assert load_config(tmp_path / "cfg.yaml", ["data.cache=use"]).data.cache == "use"  # finished: accepted


def test_corrupt_clip_is_skipped_and_listed(clips, vae_dir, tmp_path):
    records, _ = read_manifest(clips)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps({"id": r.clip_id, "video": r.video, "captions": r.captions}) for r in records[:3]]
    lines.append(json.dumps({"id": "broken", "video": str(broken), "caption": "a face"}))
    manifest.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(manifest, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}", "data.cache=auto",
                      vae=vae_dir)
    report = build(cfg)
    assert report.clips_encoded == 3 and report.skipped[0][0] == str(broken)
    assert "broken.mp4" in (tmp_path / "cache" / "report-r0.jsonl").read_text()
    # Training from it leaves the clip out, giving the reason it was skipped (item 4).
    all_records, _ = read_manifest(manifest)
    dataset = CachedClipDataset(all_records, LatentCache(tmp_path / "cache"), lambda p: p)
    assert [(m.source, m.reason.split(" (")[0]) for m in dataset.missing] == [
        (str(broken), "not in the latent cache: skipped when it was built")]
    assert report.skipped[0][1] in dataset.missing[0].reason


def test_two_rank_build_equals_one_rank(clips, vae_dir, tmp_path):
    one = cache_config(clips, vae_dir, tmp_path / "one")
    build(one)
    two_dir = tmp_path / "two" / "cache"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), str(REPO / "cache.py"), "--config",
           str(REPO / "configs/demo.yaml"), f"output_dir={tmp_path / 'two'}", f"data.manifest={clips}",
           f"vae.pretrained={vae_dir}", f"data.cache_dir={two_dir}", "data.cache_shard_clips=2",
           f"text_encoder.max_length={one.text_encoder.max_length}",  # demo.yaml's differs from the schema's
           "vae.sample_posterior=true", "data.num_workers=1",  # demo.yaml: false, 0; decode in a worker here
           *[o for o in TINY if not o.startswith("train.validation_prompts")]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads((two_dir / "report.json").read_text())["processes"] == 2
    assert {p.name.split("-")[0] for p in (two_dir / "shards").glob("*.safetensors")} == {"r0", "r1"}
    a, b = LatentCache(tmp_path / "one" / "cache"), LatentCache(two_dir)
    assert (two_dir / "index" / "clips.npy").is_file()  # written once, after both ranks finished
    assert a.windows.keys() == b.windows.keys() and len(a.windows) == 8
    assert a.text_keys() == b.text_keys() and a.text_keys()
    for clip_id, windows in a.windows.items():
        assert windows == b.windows[clip_id]
        for start, flip in windows:
            for x, y in zip(a.latent(clip_id, start, flip), b.latent(clip_id, start, flip)):
                assert torch.allclose(x, y, atol=2e-3), clip_id
    for key in a.text_keys():
        (x, m), (y, n) = a.text(key), b.text(key)
        assert torch.equal(m, n) and torch.allclose(x, y, atol=2e-3), key


def test_training_from_cache_matches_on_the_fly(clips, vae_dir, tmp_path):
    """Same seed, same batches, posterior sampling off: the losses agree (fp32 cache)."""
    common = ["train.max_steps=3", "vae.sample_posterior=false", "data.caption_dropout=0.5"]
    live = tiny_config(clips, tmp_path / "live", *common, vae=vae_dir)
    Trainer(live, TextToVideoStage(live)).fit()
    cached = tiny_config(clips, tmp_path / "cached", *common, f"data.cache_dir={tmp_path / 'cache'}",
                         "data.cache=auto", "data.cache_dtype=fp32", vae=vae_dir)
    stage = TextToVideoStage(cached)
    Trainer(cached, stage).fit()
    # Caption dropout swaps in the cache's stored empty-prompt embedding.
    cache = LatentCache(tmp_path / "cache")
    stored, _ = cache.text(text_key("", cached.text_encoder.pretrained, cached.text_encoder.max_length))
    assert torch.equal(stage.null_text[0], stored)

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    a, b = losses(tmp_path / "live"), losses(tmp_path / "cached")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) < 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


def test_fingerprint_changes_with_what_produced_the_cache(clips, vae_dir, tmp_path):
    base = expected_fingerprint(cache_config(clips, vae_dir, tmp_path))
    for override, field in [("data.resolution=8", "resolution"), ("text_encoder.max_length=16", "text_max_length"),
                            ("data.flip=true", "flip"), ("data.frame_stride=2", "frame_stride")]:
        changed = expected_fingerprint(cache_config(clips, vae_dir, tmp_path, override))
        assert [d.split(":")[0] for d in base.differences(changed)] == [field]


def test_manifest_skips_are_in_the_run_and_cache_reports(clips, vae_dir, tmp_path):
    """Item 10: manifest-level problems went to the log only, never to skipped_clips.jsonl or the cache report."""
    records, _ = read_manifest(clips)
    lines = [json.dumps({"id": r.clip_id, "video": r.video, "captions": r.captions}) for r in records[:4]]
    lines += [json.dumps({"video": str(tmp_path / "gone.mp4"), "caption": "a face"}),  # file missing
              '{"video": "x.mp4", "caption": ',  # malformed JSON
              json.dumps({"video": records[4].video, "captions": {"text": "a face"}})]  # not a string
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(manifest, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}", "data.cache=auto",
                      "train.max_steps=1", vae=vae_dir)
    Trainer(cfg, TextToVideoStage(cfg)).fit()
    expected = {str(tmp_path / "gone.mp4"): "not found", f"{manifest}:6": "JSON", f"{manifest}:7": "string"}

    def check(report: Path):
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        assert {row["video"] for row in rows} == set(expected), rows
        assert all(expected[row["video"]] in row["reason"] for row in rows), rows

    check(tmp_path / "run" / "skipped_clips.jsonl")
    check(tmp_path / "cache" / "report-r0.jsonl")
    summary = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert summary["manifest_lines_skipped"] == 3 and len(summary["manifest_skipped"]) == 3
    # A resumed run or a re-run build reads the manifest again, but reports each problem once.
    build(cfg)
    check(tmp_path / "cache" / "report-r0.jsonl")


def test_index_is_memory_mapped_shared_by_workers_and_equals_the_shards(clips, vae_dir, tmp_path):
    """Issue 23: no per-process dict of every tensor name; the finished cache's index is mapped, not copied."""
    build(cache_config(clips, vae_dir, tmp_path))
    cache = LatentCache(tmp_path / "cache")
    assert all(isinstance(getattr(cache.index, name).base, np.memmap) for name in ("clips", "windows", "texts"))
    assert not hasattr(cache, "_where")
    scanned = CacheIndex.scan(tmp_path / "cache")  # what the shards' headers say
    for name in ("clips", "clip_windows", "windows", "texts", "text_info"):
        assert np.array_equal(getattr(cache.index, name), getattr(scanned, name)), name
    records, _ = read_manifest(clips)
    assert sorted(cache.windows) == sorted(r.clip_id for r in records) and "not a clip" not in cache.windows
    # A spawned DataLoader worker receives the folder and maps it itself: the pickle holds no index arrays.
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache.index)) < 300 and isinstance(copy.index.windows.base, np.memmap)
    assert torch.equal(copy.latent(records[3].clip_id, 0, 0)[0], cache.latent(records[3].clip_id, 0, 0)[0])
    # An index that does not list the shards now in the folder is not trusted: read from the headers instead.
    shard = shard_files(tmp_path / "cache")[0]
    shard.rename(shard.with_name("r7-000000.safetensors"))
    assert CacheIndex.load(tmp_path / "cache") is None
    assert LatentCache(tmp_path / "cache").index.shards[-1] == "r7-000000.safetensors"


def _collated(cache, records, key):
    dataset = CachedClipDataset(records, cache, key, seed=1)
    return collate_clips([dataset[i] for i in range(len(records))])


def test_text_is_stored_unpadded_and_the_batch_is_the_padded_one(clips, vae_dir, tmp_path):
    """Issue 23: only the real tokens are stored; the reader pads to max_length with the same mask, and the
    denoiser's output is exactly that of the padded format (it masks padding out)."""
    long = "text_encoder.max_length=48"  # every caption shorter: padding to trim
    trimmed = cache_config(clips, vae_dir, tmp_path / "trimmed", long)
    padded = cache_config(clips, vae_dir, tmp_path / "padded", long, "unet.layout=modelscope")
    assert expected_fingerprint(trimmed).text_storage == "trimmed"
    assert expected_fingerprint(padded).text_storage == "padded"  # diffusers' UNet3D attends to padding
    build(trimmed)
    build(padded)
    a, b = LatentCache(tmp_path / "trimmed" / "cache"), LatentCache(tmp_path / "padded" / "cache")
    key = partial(text_key, encoder_id=trimmed.text_encoder.pretrained, max_length=48)
    records, _ = read_manifest(clips)
    with safe_open(str(shard_files(tmp_path / "trimmed" / "cache")[0]), framework="pt") as handle:
        stored = handle.get_slice(f"text/{key(records[0].captions[0])}/embeds").get_shape()
    assert 5 < stored[0] < 48, stored  # the real tokens only
    x, y = _collated(a, records, key), _collated(b, records, key)
    mask = y["text_mask"]
    assert torch.equal(x["text_mask"], mask) and not mask.all()
    assert torch.equal(x["text_embeds"][mask], y["text_embeds"][mask])
    assert (x["text_embeds"][~mask] == 0).all() and (y["text_embeds"][~mask] != 0).any()
    torch.manual_seed(0)
    unet = FaceVidUNet3D(in_channels=4, out_channels=4, block_out_channels=(32, 32), attention_levels=(False, True),
                         attention_head_dim=16, cross_attention_dim=384, pooled_text_conditioning=True).eval()
    latents, t = x["latent_mean"][:2], torch.tensor([10, 500])
    with torch.no_grad():
        out_trimmed = unet(latents, t, x["text_embeds"][:2], x["text_mask"][:2])
        out_padded = unet(latents, t, y["text_embeds"][:2], y["text_mask"][:2])
    assert torch.equal(out_trimmed, out_padded)
    # Padded states serve a model that masks them; trimmed ones cannot serve one that reads the padding.
    check_cache(cache_config(clips, vae_dir, tmp_path / "padded", long))
    with pytest.raises(ConfigError, match="text_storage: cache has 'trimmed', config needs 'padded'"):
        check_cache(cache_config(clips, vae_dir, tmp_path / "trimmed", long, "unet.layout=modelscope"))


def test_posterior_mean_only_without_posterior_sampling(clips, vae_dir, tmp_path):
    """Issue 23: vae.sample_posterior=false never reads the std, so it is not stored (about half the bytes)."""
    mean_only = cache_config(clips, vae_dir, tmp_path / "a", "vae.sample_posterior=false")
    both = cache_config(clips, vae_dir, tmp_path / "b")
    small, large = build(mean_only), build(both)
    # The whole std: 8 windows of (4, 4, 8, 8) fp16 (the rest of these tiny caches is caption embeddings).
    assert large.bytes_written - small.bytes_written >= 8 * 4 * 4 * 8 * 8 * 2
    a, b = LatentCache(tmp_path / "a" / "cache"), LatentCache(tmp_path / "b" / "cache")
    assert (a.fingerprint.posterior, b.fingerprint.posterior) == ("mean", "mean+std")
    for shard in shard_files(tmp_path / "a" / "cache"):
        with safe_open(str(shard), framework="pt") as handle:
            assert not [n for n in handle.keys() if n.endswith("/std")]
    clip_id = next(iter(a.windows))
    (mean, std), (mean_b, std_b) = a.latent(clip_id, 0, 0), b.latent(clip_id, 0, 0)
    assert torch.equal(mean, mean_b) and (std == 0).all() and (std_b > 0).all()
    # Posterior sampling needs the std: the mean-only cache is refused, naming the field.
    with pytest.raises(ConfigError, match="posterior: cache has 'mean', config needs 'mean\\+std'"):
        check_cache(cache_config(clips, vae_dir, tmp_path / "a"))
    # The std is only ignored without it: a mean + std cache serves, and is added to, a mean-only config.
    check_cache(cache_config(clips, vae_dir, tmp_path / "b", "vae.sample_posterior=false"))
    more = cache_config(clips, vae_dir, tmp_path / "b", "vae.sample_posterior=false", "data.cache_shard_clips=3")
    assert build(more).clips_already_cached == 8
    assert LatentCache(tmp_path / "b" / "cache").fingerprint.posterior == "mean+std"


def _fake_hub_snapshot(hub: Path, repo: str, commit: str, vae_dir: Path) -> Path:
    """The Hugging Face cache layout from_pretrained reads offline: refs/main -> snapshots/<commit>/..."""
    root = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(vae_dir, root / "snapshots" / commit / "vae")
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_hub_models_are_fingerprinted_by_their_snapshot_commit(clips, vae_dir, tmp_path, monkeypatch):
    """Issue 23: a hub model is identified by the snapshot from_pretrained loads, not by hashing its weights."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    old, new = "a" * 40, "b" * 40
    snapshot = _fake_hub_snapshot(hub, "org/face-vae", old, vae_dir)
    by_id = cache_config(clips, vae_dir, tmp_path, "vae.pretrained=org/face-vae", "vae.subfolder=vae")
    assert expected_fingerprint(by_id).vae_weights == f"hub:org/face-vae@{old}"
    assert expected_fingerprint(by_id).vae == "org/face-vae/vae"
    # The same snapshot given as a folder: the same identity, and its weights are not read.
    real_hash = cache_module.hash_weights
    monkeypatch.setattr(cache_module, "hash_weights",
                        lambda folder: pytest.fail(f"hashed {folder}") if hub in Path(folder).parents else
                        real_hash(folder))
    by_folder = cache_config(clips, vae_dir, tmp_path, f"vae.pretrained={snapshot}", "vae.subfolder=vae")
    assert expected_fingerprint(by_folder).vae_weights == f"hub:org/face-vae@{old}"
    # A local folder outside the hub cache keeps the weights' hash.
    assert len(expected_fingerprint(cache_config(clips, vae_dir, tmp_path)).vae_weights) == 64
    # The hub's main moved on (a new download): a cache of the old snapshot is refused, naming the field.
    write_fingerprint(tmp_path / "cache", expected_fingerprint(by_id))
    _fake_hub_snapshot(hub, "org/face-vae", new, vae_dir)
    assert expected_fingerprint(by_id).vae_weights == f"hub:org/face-vae@{new}"
    with pytest.raises(ConfigError, match=f"vae_weights: cache has 'hub:org/face-vae@{old}'"):
        check_cache(by_id)
    # Neither downloaded nor reachable (tests run with HF_HUB_OFFLINE=1; config validation says so first).
    with pytest.raises(ValueError, match="'org/not-downloaded' is not in the local(.|\n)*hf download"):
        cache_module.hub_revision("org/not-downloaded")


def test_old_format_version_is_refused_with_the_rebuild_command(clips, vae_dir, tmp_path, capsys):
    """Issue 23: a cache of format 1 (before index/, trimmed text ...) is an error naming both versions and the
    command that rebuilds it; that command works."""
    cfg = cache_config(clips, vae_dir, tmp_path)
    build(cfg)
    fingerprint = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())
    (tmp_path / "cache" / "fingerprint.json").write_text(json.dumps({**fingerprint, "format_version": 1}))
    use = cache_config(clips, vae_dir, tmp_path, "data.cache=use")
    message = r"format version 1, this FaceVid reads version 2(.|\n)*cache.py --config <your config> --rebuild"
    with pytest.raises(ConfigError, match=message):
        Trainer(use, TextToVideoStage(use)).fit()
    save_config(cfg, tmp_path / "cfg.yaml")
    assert cache_script.main(["--config", str(tmp_path / "cfg.yaml")]) == 2
    assert "format version 1" in capsys.readouterr().err
    assert cache_script.main(["--config", str(tmp_path / "cfg.yaml"), "--rebuild"]) == 0
    assert LatentCache(tmp_path / "cache").fingerprint.format_version == 2


def test_encode_batch_is_validated(clips, vae_dir, tmp_path):
    with pytest.raises(ConfigError, match="'data.cache_encode_batch' = 0 is invalid: must be an integer >= 1, or null"):
        cache_config(clips, vae_dir, tmp_path, "data.cache_encode_batch=0")
    cfg = cache_config(clips, vae_dir, tmp_path)
    assert cache_builder.encode_batch(cfg, torch.device("cpu")) == 1
    assert cache_builder.encode_batch(cfg, torch.device("cuda")) == 4  # only compared, never used


def test_workers_decode_and_batched_encoding_equal_the_one_window_path(clips, vae_dir, tmp_path, monkeypatch):
    """Issue 23: decoding in DataLoader workers and encoding 8 windows per VAE call store what decoding on the
    main process and encoding one window at a time (the old build) stored."""
    pids = tmp_path / "decoded_by.txt"
    real_read = cache_builder.read_frames

    def recording_read(*args, **kwargs):
        with open(pids, "a") as handle:  # forked workers: a file is how they can tell
            handle.write(f"{os.getpid()}\n")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(cache_builder, "read_frames", recording_read)
    flip = ("data.flip=true", "data.cache_windows_per_clip=1")
    build(cache_config(clips, vae_dir, tmp_path / "old", *flip, "data.num_workers=0", "data.cache_encode_batch=1"))
    assert set(pids.read_text().split()) == {str(os.getpid())}
    pids.unlink()
    build(cache_config(clips, vae_dir, tmp_path / "new", *flip, "data.num_workers=2", "data.cache_encode_batch=8"))
    workers = set(pids.read_text().split())
    assert len(workers) == 2 and str(os.getpid()) not in workers
    a, b = LatentCache(tmp_path / "old" / "cache"), LatentCache(tmp_path / "new" / "cache")
    assert dict(a.windows) == dict(b.windows) and all(w == [(0, 0), (0, 1)] for w in a.windows.values())
    for clip_id, windows in a.windows.items():
        for start, flip_ in windows:
            for x, y in zip(a.latent(clip_id, start, flip_), b.latent(clip_id, start, flip_)):
                assert torch.allclose(x, y, atol=1e-3, rtol=1e-3), clip_id  # fp16 storage
