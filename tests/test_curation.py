"""Curation on real face imagery (scikit-image's astronaut portrait and LFW crops) made into raw-looking
videos: camera pans, cuts, non-face shots, and every kind of bad input file."""

import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")

from data.curate import pipeline, runner
from data.curate.__main__ import main as curate_main
from data.curate.captions import colour_name, draft_caption
from data.curate.faces import CropWindow, HaarFaceDetector, load_detector
from data.curate.frames import iter_frames, resample
from data.curate.pipeline import CurationConfig, VideoCurator, curate_video
from data.curate.quality import ShotBoundaryDetector, thumbnail
from data.curate.runner import ConfigMismatch, run_curation
from data.curate.synthetic import (
    Shot,
    astronaut,
    face_shot,
    lfw_face,
    scene,
    scene_shot,
    shot_frames,
    write_audio_only,
    write_stream,
)
from data.manifest import read_manifest
from data.video import probe_video, read_frames

FPS = 10
SIZE = (240, 180)
# Small and quick: faces in these 240x180 videos are about 75 px wide.
CONFIG = CurationConfig(out_size=64, fps=FPS, detect_every=3, min_face=40, min_seconds=1.0)


def quiet(*_):
    return None


def write(path: Path, shots, size=SIZE, **options) -> Path:
    write_stream(path, shot_frames(shots, size, FPS), FPS, **options)
    return path


def curate(path: Path, out: Path, config: CurationConfig = CONFIG, **options) -> dict:
    return curate_video(path, out, config, load_detector("haar", 0.8 * config.min_face), **options)


# ----------------------------------------------------------------------------- building blocks


def test_haar_finds_the_real_faces_and_nothing_in_scenes():
    detector = HaarFaceDetector()
    faces = detector(astronaut())
    assert len(faces) == 1
    x, _, w, _ = faces[0]
    assert 160 < x + w / 2 < 290 and 60 < w < 130  # the astronaut's face, not her suit
    assert sum(bool(detector(lfw_face(i))) for i in range(6)) >= 4  # LFW crops: real, soft faces
    for name in ("coffee", "chelsea", "rocket"):
        assert detector(scene(name)) == []


def test_shot_boundaries_split_on_cuts_but_not_on_pans():
    detector = ShotBoundaryDetector()
    shots = [face_shot(1.0, pan=60), scene_shot("coffee", 1.0), face_shot(1.0, pan=-40, zoom=0.8)]
    cuts = [i for i, frame in enumerate(shot_frames(shots, SIZE, FPS)) if detector.is_cut(thumbnail(frame))]
    assert cuts == [10, 20]


def test_resample_turns_variable_frame_rate_into_constant():
    times = [0.0, 0.05, 0.3, 0.31, 0.32, 0.6, 1.0]
    frames = list(resample(((t, np.full((2, 2, 3), i, np.uint8)) for i, t in enumerate(times)), fps=10))
    assert [f.index for f in frames] == list(range(11))
    # each tick shows the latest source frame at or before it
    assert [int(f.rgb[0, 0, 0]) for f in frames] == [0, 1, 1, 2, 4, 4, 5, 5, 5, 5, 6]


def test_crop_window_stays_inside_the_frame():
    assert CropWindow(10, 10, 100).pixels(320, 240) == (0, 0, 100)  # shifted, not padded
    assert CropWindow(300, 200, 500).pixels(320, 240) == (80, 0, 240)  # shrunk to fit
    halfway = CropWindow(0, 0, 100).blend(CropWindow(100, 50, 200), 0.5)
    assert (halfway.cx, halfway.cy, halfway.side) == (50, 25, 150)


def test_iter_frames_applies_rotation_and_keeps_odd_sizes(tmp_path):
    portrait = list(face_shot(0.5).frames((180, 240), FPS))
    write_stream(tmp_path / "r.mp4", (np.rot90(f, -1) for f in portrait), FPS, rotation=90)
    (_, first), *_ = iter_frames(tmp_path / "r.mp4")
    assert first.shape == (240, 180, 3)
    assert np.abs(first.astype(int) - portrait[0]).mean() < 8
    write(tmp_path / "odd.mp4", [face_shot(0.3)], size=(101, 77))
    assert next(iter_frames(tmp_path / "odd.mp4"))[1].shape == (77, 101, 3)


# ----------------------------------------------------------------------------- one video


def test_faces_kept_cuts_split_clips_and_scenes_dropped(tmp_path):
    raw = write(tmp_path / "raw.mp4", [
        face_shot(3.0, talking=True), face_shot(3.0, pan=-40, zoom=0.8),  # direct cut between two face shots
        scene_shot("coffee", 2.0), face_shot(3.0, pan=60), scene_shot("chelsea", 1.5),
        scene_shot("rocket", 1.5)])
    result = curate(raw, tmp_path / "out")
    assert result["status"] == "kept"
    ranges = [t for clip in result["clips"] for t in clip["source_time_range"]]
    assert ranges == pytest.approx([0, 3, 3, 6, 8, 11], abs=0.31)
    assert result["dropped_seconds"]["no face"] == pytest.approx(5.0, abs=0.5)
    # every decoded second is accounted for: kept in a clip or dropped with a reason
    assert result["kept_seconds"] + sum(result["dropped_seconds"].values()) == pytest.approx(result["seconds"])
    first = result["clips"][0]
    assert first["attributes"]["action"] == "talking" and result["clips"][2]["attributes"]["action"] != "talking"
    assert first["captions"][0].startswith("a person talking")
    clip = tmp_path / "out" / first["video"]
    assert clip.parent.name == "clips"
    info = probe_video(clip)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 64, FPS, 30)


def test_memory_stays_bounded_on_a_long_shot():
    """A 30 s single shot streams through: at most detect_every frames wait, clips split at max_seconds."""
    config = CurationConfig(**CONFIG.to_dict() | {"max_seconds": 3.0})
    kept = []
    curator = VideoCurator(config, load_detector("haar", 32), lambda crops, stats: kept.append(len(crops)))
    for frame in resample(((i / FPS, f) for i, f in enumerate(face_shot(30.0, pan=30).frames(SIZE, FPS))), FPS):
        curator.feed(frame)
        assert len(curator.pending) < config.detect_every
        assert curator.clip is None or len(curator.clip.crops) <= 3 * FPS
    curator.finish()
    assert len(kept) == 10 and sum(kept) == 300


def test_talking_is_told_from_keeping_still(tmp_path):
    for talking in (True, False):
        result = curate(write(tmp_path / f"{talking}.mp4", [face_shot(2.0, talking=talking)]), tmp_path / "o")
        assert result["clips"][0]["attributes"]["action"] == ("talking" if talking else "still")


def test_crop_follows_the_face_smoothly(tmp_path):
    # the camera pans over 60 px of the face's 75, staying clear of the frame edge (where the crop
    # stops and the face moves inside it)
    result = curate(write(tmp_path / "pan.mp4", [face_shot(3.0, pan=50)]), tmp_path / "out",
                    CurationConfig(out_size=128, fps=FPS, detect_every=3, min_face=40, min_seconds=1.0))
    frames = read_frames(tmp_path / "out" / result["clips"][0]["video"], range(30))
    detector = HaarFaceDetector(min_neighbors=3)
    centres = [x + w / 2 for frame in frames for x, _, w, _ in detector(frame)[:1]]
    assert len(centres) > 20
    assert max(centres) - min(centres) < 8  # the face stays put in the crop while the camera pans
    steps = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    assert steps.max() < 3 * np.median(steps) + 2  # no jumps between keyframes


@pytest.mark.parametrize("case, reason", [
    ("dark", "too dark"), ("blurred", "blurry"), ("letterboxed", "black borders"),
    ("fast pan", "too much camera motion"), ("two faces", "multiple faces"), ("small face", "face too small"),
    ("bright", "too bright"), ("short", "too short"),
])
def test_each_filter_drops_with_its_reason(tmp_path, case, reason):
    config = CONFIG
    frames = list(shot_frames([face_shot(2.0, pan=200 if case == "fast pan" else 40)], SIZE, FPS))
    if case == "dark":
        frames = [(f * 0.12).astype(np.uint8) for f in frames]
    elif case == "blurred":
        frames = [cv2.GaussianBlur(f, (0, 0), 3) for f in frames]
    elif case == "letterboxed":
        for f in frames:
            f[:40], f[-40:] = 0, 0
    elif case == "two faces":
        frames = [np.concatenate([f, f[:, ::-1]], axis=1) for f in frames]
    elif case == "small face":
        config = CurationConfig(**CONFIG.to_dict() | {"min_face": 90})
    elif case == "bright":
        config = CurationConfig(**CONFIG.to_dict() | {"max_brightness": 100})
    elif case == "short":
        frames = frames[:7]
    write_stream(tmp_path / "v.mp4", frames, FPS)
    result = curate(tmp_path / "v.mp4", tmp_path / "out", config)
    assert result["status"] == "dropped"
    main_reason = max(result["dropped_seconds"], key=result["dropped_seconds"].get)
    assert main_reason == reason, result["reason"]
    assert result["reason"].startswith("no usable clip: " + reason)


def test_lfw_faces_are_found(tmp_path):
    shots = [Shot(lfw_face(i), 1.5, (0, 0, 320), (10, 5, 300)) for i in (0, 1, 3)]
    result = curate(write(tmp_path / "lfw.mp4", shots), tmp_path / "out")
    found = result["kept_seconds"] + sum(v for k, v in result["dropped_seconds"].items() if k != "no face")
    assert found >= 2.0  # most of the 4.5 s shows a detected face (kept, or dropped by a quality filter)


def test_captioner_hook_and_its_failures(tmp_path):
    raw = write(tmp_path / "raw.mp4", [face_shot(2.0)])
    seen = {}

    def captioner(frames, stats):
        seen["shape"], seen["stats"] = frames.shape, stats
        return "a woman with short blond hair smiling"

    result = curate(raw, tmp_path / "out", captioner=captioner)
    clip = result["clips"][0]
    assert clip["captions"][0] == "a woman with short blond hair smiling"
    assert clip["captions"][1] == clip["draft_caption"]
    assert seen["shape"] == (20, 64, 64, 3) and "brightness" in seen["stats"]

    def broken(frames, stats):
        raise RuntimeError("model exploded")

    result = curate(raw, tmp_path / "out", captioner=broken)
    assert result["clips"][0]["captions"] == [result["clips"][0]["draft_caption"]]
    assert "model exploded" in result["warnings"][0]


def test_draft_caption_words_follow_the_measurements():
    assert [colour_name(np.uint8(c)) for c in ([200, 30, 30], [20, 20, 20], [128, 128, 128], [40, 60, 200],
                                              [240, 240, 235], [110, 70, 30])] == \
        ["red", "black", "gray", "blue", "white", "brown"]
    stats = {"brightness": 60.0, "warmth": -30.0, "mouth_motion": 0.0, "face_motion": 0.5, "face_share": 0.45,
             "face_offset": 0.2, "background": "blue"}
    caption, attributes = draft_caption(stats)
    assert caption == ("a person moving their head, head and shoulders, face on the right. "
                       "The background is mostly blue, with dim, cool lighting.")
    assert attributes["lighting"] == "dim" and attributes["action"] == "moving their head"


def test_detector_plugs_in_by_name():
    detector = load_detector("data.curate.faces:HaarFaceDetector")
    assert len(detector(astronaut())) == 1
    with pytest.raises(ValueError, match="package.module:name"):
        load_detector("not-a-spec")


# ----------------------------------------------------------------------------- many inputs, bad inputs


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    face = [face_shot(2.0)]
    good = write(raw / "good.mp4", face)
    write(raw / "фото лица 顔.mp4", face)
    write(raw / "portrait.mp4", face, size=(180, 240))
    portrait = shot_frames(face, (180, 240), FPS)
    write_stream(raw / "rotated.mp4", (np.rot90(f, -1) for f in portrait), FPS, rotation=90)
    times = np.cumsum(np.random.default_rng(0).uniform(0.04, 0.16, 20))
    write_stream(raw / "vfr.mp4", shot_frames(face, SIZE, FPS), FPS, times=list(times - times[0]))
    write(raw / "odd_101x77.mp4", face, size=(101, 77))
    write_stream(raw / "two_frames.mp4", list(shot_frames(face, SIZE, FPS))[:2], FPS)
    write(raw / "scenes.mp4", [scene_shot("coffee", 1.0), scene_shot("rocket", 1.0)])
    (raw / "zero.mp4").write_bytes(b"")
    (raw / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (raw / "text.mp4").write_text("just some text, renamed to .mp4\n", encoding="utf-8")
    write_audio_only(raw / "audio.mp4")
    (raw / "notes.txt").write_text("not a video", encoding="utf-8")
    return raw


def by_name(report: dict) -> dict:
    return {Path(entry["input"]).name: entry for entry in report["inputs"]}


def test_bad_inputs_are_reported_and_none_stops_the_run(bad_corpus, tmp_path):
    out = tmp_path / "out"
    report = run_curation([bad_corpus], out, CONFIG, workers=2, echo=quiet)
    entries = by_name(report)
    assert len(entries) == 12 and report["ignored_files"] == [str(bad_corpus / "notes.txt")]
    for name in ("good.mp4", "фото лица 顔.mp4", "portrait.mp4", "rotated.mp4", "vfr.mp4"):
        assert entries[name]["status"] == "kept", (name, entries[name]["reason"])
    assert entries["zero.mp4"] == entries["zero.mp4"] | {"status": "error", "reason": "file is empty (0 bytes)"}
    assert "not a readable video" in entries["truncated.mp4"]["reason"]
    assert "not a readable video" in entries["text.mp4"]["reason"]
    assert entries["audio.mp4"]["reason"] == "no video stream (streams: audio)"
    assert entries["two_frames.mp4"]["status"] == "dropped" and "too short" in entries["two_frames.mp4"]["reason"]
    assert entries["odd_101x77.mp4"]["status"] == "dropped"  # faces of ~28 px: below min_face
    assert entries["scenes.mp4"]["reason"] == "no usable clip: no face 2.0 s"

    records, skipped = read_manifest(out / "manifest.jsonl")
    assert skipped == [] and len(records) == report["summary"]["clips"] == 5
    assert {Path(r.extra["source_video"]).name for r in records} == {
        "good.mp4", "фото лица 顔.mp4", "portrait.mp4", "rotated.mp4", "vfr.mp4"}
    assert all(r.clip_id.isascii() for r in records)
    vfr = next(r for r in records if r.extra["source_video"].endswith("vfr.mp4"))
    assert probe_video(vfr.video).fps == FPS
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk["summary"] == report["summary"] and on_disk["config"]["min_face"] == 40
    assert report["summary"]["errors"] == 4 and report["summary"]["kept"] == 5


def test_resume_skips_finished_inputs(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a", "b", "c"):
        write(raw / f"{name}.mp4", [face_shot(1.5)])
    out = tmp_path / "out"
    first = run_curation([raw], out, CONFIG, limit=2, echo=quiet)  # "interrupted" after two inputs
    assert first["summary"]["inputs"] == 2
    # a crash mid-append leaves a torn line, and a half-written clip of the input in flight
    with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"input": "/torn')
    stale = out / "clips" / f"{pipeline.clip_prefix(raw / 'c.mp4')}_007.mp4"
    stale.write_bytes(b"partial")

    processed = []
    real = runner.process_input
    monkeypatch.setattr(runner, "process_input", lambda path, *rest: processed.append(path) or real(path, *rest))
    second = run_curation([raw], out, CONFIG, echo=quiet)
    assert [Path(p).name for p in processed] == ["c.mp4"]
    assert second["summary"]["inputs"] == 3 and second["summary"]["clips"] == 3
    assert not stale.exists()
    assert len((out / "results.jsonl").read_text().splitlines()) == 3

    processed.clear()
    run_curation([raw], out, CONFIG, echo=quiet)  # nothing left to do
    assert processed == []
    (raw / "a.mp4").write_bytes((raw / "b.mp4").read_bytes())  # a changed input is redone
    run_curation([raw], out, CONFIG, echo=quiet)
    assert [Path(p).name for p in processed] == ["a.mp4"]

    with pytest.raises(ConfigMismatch, match="min_face"):
        run_curation([raw], out, CurationConfig(**CONFIG.to_dict() | {"min_face": 50}), echo=quiet)
    redone = run_curation([raw], out, CurationConfig(**CONFIG.to_dict() | {"min_face": 50}), redo=True,
                          echo=quiet)
    assert redone["summary"]["inputs"] == 3


def test_cli(tmp_path, capsys):
    raw = write(tmp_path / "one.mp4", [face_shot(1.5)])
    listing = tmp_path / "inputs.txt"
    listing.write_text("one.mp4\nmissing.mp4\n", encoding="utf-8")
    code = curate_main(["--input", str(listing), "--out", str(tmp_path / "out"), "--fps", "10",
                        "--out-size", "64", "--min-face", "40", "--min-seconds", "1", "--detect-every", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept 1, dropped 0, errors 1" in printed and "missing.mp4: file not found" in printed
    assert (tmp_path / "out" / "manifest.jsonl").read_text().count("\n") == 1
    assert raw.exists()
