"""The latent / text-embedding cache: format, fingerprint, resumable and multi-rank builds, and
training from it. Tiny FaceVid-Synth clips and a VAE trained for a few steps, through production code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import TINY, tiny_config, train_tiny_vae

import cache as cache_script
import train as train_script
from data import synth
from data.cache import LatentCache, text_key, write_fingerprint
from data.dataset import CachedClipDataset, VideoClipDataset
from data.manifest import read_manifest
from facevid import cache_builder
from facevid.cache_builder import build_cache, expected_fingerprint
from facevid.config import ConfigError, load_config, save_config
from facevid.stages import TextToVideoStage
from facevid.trainer import Trainer, build_accelerator
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
