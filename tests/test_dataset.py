import numpy as np
import pytest
import torch
from conftest import smooth_frames
from torch.utils.data import DataLoader

from data.dataset import VideoClipDataset, collate_clips, window_starts
from data.manifest import ClipRecord
from data.video import VideoDecodeError, VideoInfo, tensor_to_frames

SIZE = 32
FPS = 12.0


@pytest.fixture
def clips(make_video):
    """make(name, num_frames, **record fields) -> ClipRecord of a fresh 32x32 mp4."""
    def make(name: str, num_frames: int = 24, **fields) -> ClipRecord:
        path, _ = make_video(f"{name}.mp4", num_frames=num_frames, height=SIZE, width=SIZE, fps=FPS)
        fields.setdefault("captions", [f"{name} one", f"{name} two"])
        fields.setdefault("fps", FPS)
        return ClipRecord(clip_id=name, video=str(path), **fields)

    return make


def frame_indices(item: dict, num_frames: int) -> list[int]:
    """Which source frames an item holds: the nearest frame of the (known) source video."""
    source = smooth_frames(num_frames, SIZE, SIZE).astype(np.float32)
    got = tensor_to_frames(item["pixel_values"]).astype(np.float32)
    return np.abs(got[:, None] - source[None]).mean(axis=(2, 3, 4)).argmin(axis=1).tolist()


def test_item_shapes_and_values(clips):
    records = [clips("a"), clips("b", captions=[])]
    dataset = VideoClipDataset(records, num_frames=8, frame_stride=2, resolution=16)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 8, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["caption"] in records[0].captions and item["clip_id"] == "a"
    assert item["index"] == 0 and item["skipped"] == []
    assert dataset[1]["caption"] == ""  # no caption: unconditional


def test_window_is_strided_and_random_per_epoch(clips):
    dataset = VideoClipDataset([clips("a", num_frames=24)], num_frames=4, frame_stride=3, resolution=SIZE)
    starts = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        indices = frame_indices(dataset[0], 24)
        assert np.all(np.diff(indices) == 3) and indices[-1] < 24
        starts.add(indices[0])
    assert len(starts) > 2


def test_same_seed_epoch_and_index_give_the_same_item(clips):
    records = [clips("a"), clips("b")]
    first = VideoClipDataset(records, num_frames=4, seed=5)
    second = VideoClipDataset(records, num_frames=4, seed=5)
    first.set_epoch(3)
    second.set_epoch(3)
    np.random.seed(123)  # global RNG state must not matter
    a = first[1]
    np.random.seed(456)
    b = second[1]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]

    def item_in_epoch(epoch):
        first.set_epoch(epoch)
        return first[1]["pixel_values"]

    assert any(not torch.equal(a["pixel_values"], item_in_epoch(epoch)) for epoch in range(4, 12))


def test_two_workers_give_the_same_batches_as_none(clips):
    dataset = VideoClipDataset([clips(f"c{i}") for i in range(4)], num_frames=4, frame_stride=2, seed=1)
    dataset.set_epoch(2)

    def batches(num_workers):
        loader = DataLoader(dataset, batch_size=2, collate_fn=collate_clips, num_workers=num_workers)
        return list(loader)

    for serial, parallel in zip(batches(0), batches(2), strict=True):
        assert torch.equal(serial["pixel_values"], parallel["pixel_values"])
        assert serial["caption"] == parallel["caption"] and serial["index"] == parallel["index"]


def test_window_stays_inside_frame_range_and_time_range(clips):
    by_frames = clips("frames", num_frames=30, frame_range=(10, 20))
    by_time = clips("time", num_frames=30, time_range=(1.0, 2.0))  # frames [12, 24) at 12 fps
    dataset = VideoClipDataset([by_frames, by_time], num_frames=3, frame_stride=2, resolution=SIZE)
    seen = {0: set(), 1: set()}
    for epoch in range(12):
        dataset.set_epoch(epoch)
        for index, (low, high) in enumerate([(10, 20), (12, 24)]):
            indices = frame_indices(dataset[index], 30)
            assert low <= indices[0] and indices[-1] < high, (index, indices)
            seen[index].add(indices[0])
    assert len(seen[0]) > 1 and len(seen[1]) > 1


def test_target_fps_sets_the_stride(clips):
    dataset = VideoClipDataset([clips("a", num_frames=24)], num_frames=4, frame_stride=1, target_fps=FPS / 3,
                               resolution=SIZE)
    assert np.all(np.diff(frame_indices(dataset[0], 24)) == 3)


def test_bad_clips_are_skipped_reported_and_replaced(clips, tmp_path):
    corrupt = clips("corrupt")
    with open(corrupt.video, "r+b") as handle:  # garbage over the start of a real mp4
        handle.write(np.random.default_rng(0).bytes(512))
    short = clips("short", num_frames=3)
    good = clips("good")
    missing = ClipRecord(clip_id="missing", video=str(tmp_path / "gone.mp4"), captions=["x"])
    dataset = VideoClipDataset([corrupt, short, missing, good], num_frames=4, resolution=SIZE)

    item = dataset[0]
    assert item["index"] == 3 and item["clip_id"] == "good"
    assert item["pixel_values"].shape == dataset[3]["pixel_values"].shape
    assert [s.source for s in item["skipped"]] == [corrupt.video, short.video, missing.video]
    reasons = [s.reason for s in item["skipped"]]
    assert "not a readable video" in reasons[0]
    assert "too short" in reasons[1] and "needs 4" in reasons[1]
    assert "not found" in reasons[2]

    batch = collate_clips([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 4, SIZE, SIZE)
    assert batch["index"] == [3, 3, 3, 3] and len(batch["skipped"]) == 3 + 2 + 1


def test_gives_up_after_max_substitutions_naming_the_files(clips):
    broken = [clips(f"bad{i}", num_frames=2) for i in range(5)]
    dataset = VideoClipDataset(broken + [clips("good")], num_frames=4, max_substitutions=2)
    with pytest.raises(RuntimeError, match="3 tried") as err:
        dataset[0]
    assert all(record.video in str(err.value) for record in broken[:3])
    assert dataset[3]["clip_id"] == "good"  # within reach: bad3, bad4, good


def test_window_starts_are_evenly_spread_over_the_valid_ones():
    record = ClipRecord(clip_id="a", video="a.mp4", captions=[], fps=25.0, frame_range=(10, 60))
    info = VideoInfo(num_frames=100, fps=25.0, width=32, height=32)
    windows = window_starts(record, info, num_frames=4, frame_stride=2, max_windows=3)
    assert [start for start, _ in windows] == [10, 32, 53]  # valid starts: 10 .. 60 - 7 (the span)
    assert windows[0][1] == [10, 12, 14, 16]
    assert len(window_starts(record, info, num_frames=4, frame_stride=2)) == 44  # no limit: all of them
    with pytest.raises(VideoDecodeError, match="too short"):
        window_starts(record, info, num_frames=30, frame_stride=2)


def test_captions_must_be_strings(tmp_path, make_video):
    """Item 10: a caption given as an object was accepted, its key becoming the caption."""
    import json

    from data.manifest import read_manifest

    path, _ = make_video("a.mp4")
    lines = [{"video": "a.mp4", "caption": "a face"}, {"video": "a.mp4", "captions": {"text": "a face"}},
             {"video": "a.mp4", "caption": {"en": "a face"}}, {"video": "a.mp4", "captions": ["a face", 3]}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, skipped = read_manifest(manifest)
    assert [r.captions for r in records] == [["a face"]]
    assert [s.source for s in skipped] == [f"{manifest}:{n}" for n in (2, 3, 4)]
    assert all("caption" in s.reason and "string" in s.reason for s in skipped), skipped
    assert "dict" in skipped[0].reason and "int" in skipped[2].reason


def test_window_longer_than_every_clip_is_a_config_error(tmp_path, make_video):
    """Item 10: data.num_frames x stride (or target fps) longer than every clip failed at the first batch."""
    import json

    from data.manifest import read_manifest
    from facevid.config import load_config
    from facevid.schema import ConfigError
    from facevid.validation import validate_clips

    for name, frames in (("a", 10), ("b", 12)):
        make_video(f"{name}.mp4", num_frames=frames, fps=FPS)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"video": f"{n}.mp4", "caption": "x"}) + "\n" for n in "ab"))
    records, _ = read_manifest(manifest)

    def check(*overrides):
        validate_clips(load_config(None, [f"data.manifest={manifest}", f"output_dir={tmp_path}", "stage=vae",
                                          *overrides]), records)

    check("data.num_frames=12")  # b fits exactly
    check("data.num_frames=6", "data.frame_stride=2")
    with pytest.raises(ConfigError, match=r"data.num_frames' = 13 .*longest of the 2 clips checked has 12 usable"):
        check("data.num_frames=13")
    with pytest.raises(ConfigError, match=r"data.num_frames' = 4 .*target_fps=3.0 \(stride 4\) spans 13 frames"):
        check("data.num_frames=4", "data.target_fps=3")
    # The trainer checks before its first step (it failed at the first batch: "no usable clip among 17 tried").
    from facevid.stages import STAGES
    from facevid.trainer import Trainer

    cfg = load_config(None, [f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "stage=vae",
                             "data.num_frames=13", "data.num_workers=0", "train.tracker=none"])
    with pytest.raises(ConfigError, match="data.num_frames' = 13"):
        Trainer(cfg, STAGES["vae"](cfg)).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
