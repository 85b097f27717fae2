"""Dataset adapters on small fixtures in each release's real layout (tiny real mp4s)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import smooth_frames
from PIL import Image

from data.adapters import report_path, run_adapter
from data.adapters.__main__ import main as adapters_main
from data.adapters.celebv import celebvhq_caption, gerund
from data.manifest import read_manifest
from data.video import read_frames, write_video

FRAMES = np.full((2, 16, 16, 3), 128, np.uint8)


def make_videos(folder: Path, *names: str) -> None:
    for name in names:
        write_video(folder / name, FRAMES, fps=10)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def run(name, root, tmp_path, **options):
    out = tmp_path / "out" / "manifest.jsonl"
    report = run_adapter(name, root, out, echo=lambda *_: None, **options)
    records, skipped = read_manifest(out, require_caption=not options.get("allow_uncaptioned"))
    assert skipped == []
    assert json.loads(report_path(out).read_text()) == report
    return {r.clip_id: r for r in records}, report


def sources(items) -> str:
    return " | ".join(f"{item['source']}: {item['reason']}" for item in items)


# ----------------------------------------------------------------------------- FaceVid-1K


FACEVID_ENTRY = {"Ethnicity": "asian", "Gender": "male", "Appearance": ["20s", "wearing a white hoodie"],
                 "Emotion": "neutral", "Action": ["talking", "nodding"],
                 "Environment": {"Lighting": "artificial lighting", "Setting": "indoors"}}


def test_facevid1k_per_clip_json(tmp_path):
    root = tmp_path / "facevid"
    make_videos(root / "videos" / "part1", "fv_0001.mp4", "fv_0002.mp4")
    write_json(root / "annotations" / "fv_0001.json", FACEVID_ENTRY | {"Caption": "asian male talking"})
    write_json(root / "annotations" / "fv_0002.json", FACEVID_ENTRY)  # no caption: composed from fields
    write_json(root / "annotations" / "fv_0003.json", FACEVID_ENTRY | {"Caption": "x"})  # video missing
    (root / "annotations" / "fv_0004.json").write_text("{not json", encoding="utf-8")

    clips, report = run("facevid1k", root, tmp_path)
    assert set(clips) == {"fv_0001", "fv_0002"}
    first = clips["fv_0001"]
    assert first.captions == ["asian male talking"]
    assert first.attributes["ethnicity"] == "asian" and first.attributes["action"] == ["talking", "nodding"]
    assert first.attributes["environment"] == {"lighting": "artificial lighting", "setting": "indoors"}
    assert Path(first.video).name == "fv_0001.mp4"
    assert clips["fv_0002"].captions == [
        ("asian, male, 20s, wearing a white hoodie, talking, nodding, neutral expression, "
         "artificial lighting, indoors")]
    assert (report["clips_found"], report["clips_written"]) == (4, 2)
    assert report["clips_missing_on_disk"] == 1 and "fv_0003" in sources(report["missing"])
    assert report["annotation_errors"] == 1 and "fv_0004.json" in sources(report["errors"])
    assert "invalid JSON" in sources(report["errors"])


def test_facevid1k_one_jsonl_and_one_json(tmp_path):
    root = tmp_path / "facevid"
    make_videos(root / "clips", "a.mp4", "b.mp4", "c.mp4")
    lines = [json.dumps({"video": "clips/a.mp4", "caption": "a woman smiling"} | FACEVID_ENTRY),
             "{broken", json.dumps(["not", "an", "object"])]
    (root / "ann.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(root / "more.json", {"b": {"caption": "a man nodding"}, "c": {"Emotion": "happy"},
                                    "a": {"caption": "the same clip again"}})

    clips, report = run("facevid1k", root, tmp_path)
    assert set(clips) == {"a", "b", "c"}
    assert clips["c"].captions == ["happy expression"]
    assert report["annotation_errors"] == 3
    errors = sources(report["errors"])
    assert "ann.jsonl:2" in errors and "ann.jsonl:3" in errors and "duplicate clip id 'a'" in errors

    # --annotations restricts to one file
    clips, report = run("facevid1k", root, tmp_path, annotations=root / "more.json")
    assert clips["a"].captions == ["the same clip again"] and report["annotation_errors"] == 0


# ----------------------------------------------------------------------------- CelebV-HQ


APPEARANCE = ["blurry", "male", "young", "blonde_hair", "wavy_hair", "long_hair", "eyeglasses",
              "wearing_hat", "big_nose", "5_o_clock_shadow"]
ACTIONS = ["talk", "smile", "nod", "shake_head", "close_eyes", "make_a_face", "head_wagging"]


def hq_clip(ytb_id, appearance, actions, emotion, bbox=None):
    return {"ytb_id": ytb_id, "duration": {"start_sec": 10.5, "end_sec": 15.0},
            "bbox": bbox or {"top": 0.1, "bottom": 0.8, "left": 0.2, "right": 0.7},
            "attributes": {"appearance": appearance, "action": actions, "emotion": emotion}}


def test_celebvhq_captions_from_attributes(tmp_path):
    root = tmp_path / "celebvhq"
    make_videos(root / "35666", "clip_a.mp4", "yt_raw.mp4")
    info = {"meta_info": {"appearance_mapping": APPEARANCE, "action_mapping": ACTIONS},
            "clips": {
                # processed clip on disk (<clip_id>.mp4): already trimmed, time range kept as source_*
                "clip_a": hq_clip("yt_a", [1, 0, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0],
                                  {"sep_flag": False, "labels": "happy"}),
                # only the raw source is on disk (<ytb_id>.mp4): the time range applies
                "clip_b": hq_clip("yt_raw", [0, 1, 0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 1, 1],
                                  {"sep_flag": True, "labels": [
                                      {"sttime": 0, "edtime": 2, "emotion": "neutral"},
                                      {"sttime": 2, "edtime": 4.5, "emotion": "surprise"}]}),
                "clip_missing": hq_clip("yt_gone", [0] * 10, [0] * 7, {"sep_flag": False, "labels": "sad"}),
                "clip_bad": hq_clip("yt_a", [1, 0], [0] * 7, {"sep_flag": False, "labels": "sad"}),
                "clip_bad_box": hq_clip("yt_raw", [0] * 10, [0] * 7, {"sep_flag": False, "labels": "sad"},
                                        bbox={"top": 10, "bottom": 300, "left": 0, "right": 200}),
            }}
    write_json(root / "celebvhq_info.json", info)

    clips, report = run("celebvhq", root, tmp_path)
    assert set(clips) == {"clip_a", "clip_b"}
    a, b = clips["clip_a"], clips["clip_b"]
    assert a.captions == [("a young woman with long wavy blond hair, wearing eyeglasses, wearing hat, "
                           "talking, smiling, happy expression")]  # 'blurry' is image quality: left out
    assert a.attributes == {"appearance": ["blurry", "young", "blonde_hair", "wavy_hair", "long_hair",
                                           "eyeglasses", "wearing_hat"],
                            "action": ["talk", "smile"], "emotion": "happy"}
    assert a.time_range is None and a.extra["source_time_range"] == [10.5, 15.0]
    assert a.extra["source_bbox"]["left"] == 0.2
    assert b.captions == [("a man with big nose, a five o'clock shadow, nodding, shaking head, making a face, "
                           "head wagging, neutral, then surprise expression")]
    assert b.time_range == (10.5, 15.0) and b.extra["bbox"]["unit"] == "normalised"
    assert Path(b.video).name == "yt_raw.mp4" and len(b.extra["emotion_segments"]) == 2
    assert report["clips_missing_on_disk"] == 1 and "clip_missing" in sources(report["missing"])
    errors = sources(report["errors"])
    assert "clip_bad:" in errors and "list of 10 0/1 flags" in errors
    assert "clip_bad_box" in errors and "normalised" in errors


def test_celebvhq_template_matches_the_facevid_style():
    assert celebvhq_caption(["blonde_hair", "eyeglasses"], ["smile", "talk"], ["happy"], False) == \
        "a person with blond hair, wearing eyeglasses, smiling, talking, happy expression"
    assert [gerund(v) for v in ("nod", "sneeze", "blow", "listen_to_music", "read", "turn")] == \
        ["nodding", "sneezing", "blowing", "listening to music", "reading", "turning"]


def test_celebvhq_unreadable_info_is_reported(tmp_path):
    root = tmp_path / "celebvhq"
    root.mkdir()
    (root / "celebvhq_info.json").write_text("[1, 2", encoding="utf-8")
    _, report = run("celebvhq", root, tmp_path)
    assert report["clips_written"] == 0 and "invalid JSON" in sources(report["errors"])


# ----------------------------------------------------------------------------- CelebV-Text


def test_celebvtext_keeps_every_text(tmp_path):
    root = tmp_path / "celebvtext"
    make_videos(root / "videos", "ct_1.mp4", "ct_2.mp4", "ct_4.mp4")
    write_json(root / "celebvtext_info.json", {"clips": {
        "ct_1": {"ytb_id": "y1", "duration": {"start_sec": 1.0, "end_sec": 6.0},
                 "bbox": {"top": 20, "bottom": 420, "left": 100, "right": 480}},
        "ct_2": {"ytb_id": "y2", "duration": {"start_sec": 0.0, "end_sec": 3.0}},  # no text at all
        "ct_3": {"ytb_id": "y3", "duration": {"start_sec": 0.0, "end_sec": 3.0}},  # no video
    }})
    texts = root / "texts"
    for kind, clip, lines in [("face40_details_new", "ct_1", ["She has long hair.", "She is young."]),
                              ("action_dur", "ct_1", ["She talks, then smiles."]),
                              ("emotion", "ct_1", ["She looks happy."]),
                              ("light_dir", "ct_1", ["", "Light comes from the left."]),
                              ("emotion", "ct_3", ["calm"]),
                              ("emotion", "ct_4", ["He frowns."])]:
        (texts / kind).mkdir(parents=True, exist_ok=True)
        (texts / kind / f"{clip}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    clips, report = run("celebvtext", root, tmp_path)
    assert set(clips) == {"ct_1", "ct_4"}  # ct_4 has texts but no info entry: kept, noted
    one = clips["ct_1"]
    assert sorted(one.captions) == sorted(["She has long hair.", "She is young.", "She talks, then smiles.",
                                           "She looks happy.", "Light comes from the left."])
    assert sorted(set(one.extra["caption_kinds"])) == ["action_dur", "emotion", "face40_details_new",
                                                      "light_dir"]
    assert one.extra["source_bbox"] == {"top": 20, "bottom": 420, "left": 100, "right": 480, "unit": "pixels"}
    assert "ct_2" in sources(report["errors"]) and "no text" in sources(report["errors"])
    assert "ct_3" in sources(report["missing"])
    assert any("no info entry" in note for note in report["notes"])


# ----------------------------------------------------------------------------- folder / HDTF and CSV


def test_folder_with_same_name_captions(tmp_path):
    root = tmp_path / "hdtf"
    make_videos(root, "WDA_Speaker_000.mp4", "RD_Radio_001.mp4")
    make_videos(root / "extra", "ünïcode clip.mp4")
    (root / "WDA_Speaker_000.txt").write_text("a man in a suit talking\na politician speaking\n", "utf-8")
    (root / "extra" / "ünïcode clip.txt").write_text("a woman talking", "utf-8")
    (root / "orphan.txt").write_text("no video for this one", "utf-8")

    clips, report = run("folder", root, tmp_path)
    assert set(clips) == {"WDA_Speaker_000", "extra__ünïcode clip"}
    assert clips["WDA_Speaker_000"].captions == ["a man in a suit talking", "a politician speaking"]
    assert "RD_Radio_001.mp4" in sources(report["errors"]) and "no caption" in sources(report["errors"])
    assert "orphan.txt" in sources(report["missing"])

    clips, report = run("folder", root, tmp_path, allow_uncaptioned=True)
    assert clips["RD_Radio_001"].captions == [] and report["annotation_errors"] == 0


def test_csv_path_caption(tmp_path):
    root = tmp_path / "mine"
    make_videos(root / "v", "one.mp4", "two.mp4")
    (root / "captions.csv").write_text(
        "path,caption,Emotion\n"
        "v/one.mp4,a woman smiling,happy\n"
        "v/one.mp4,\"a smiling woman, indoors\",happy\n"
        "v/two.mp4,,neutral\n"
        "v/three.mp4,a man,neutral\n"
        "v/two.mp4,a man,talking,extra cell\n", encoding="utf-8")

    clips, report = run("csv", root, tmp_path)
    assert set(clips) == {"v__one"}
    assert clips["v__one"].captions == ["a woman smiling", "a smiling woman, indoors"]
    assert clips["v__one"].attributes == {"emotion": "happy"}
    assert report["clips_missing_on_disk"] == 1 and "captions.csv:5" in sources(report["missing"])
    errors = sources(report["errors"])
    assert "captions.csv:4" in errors and "captions.csv:6" in errors and "quote captions" in errors
    assert any("two.mp4" in note for note in report["notes"])  # on disk, in no row that worked


def test_cli_writes_manifest_and_report(tmp_path, capsys):
    root = tmp_path / "hdtf"
    make_videos(root, "a.mp4")
    (root / "a.txt").write_text("a person talking", "utf-8")
    out = tmp_path / "m.jsonl"
    assert adapters_main(["folder", "--root", str(root), "--out", str(out), "--probe"]) == 0
    records, _ = read_manifest(out)
    assert records[0].fps == 10.0
    assert "clips found: 1, written: 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.report.json").read_text())["clips_written"] == 1
    # an empty folder writes an empty manifest and says so through the exit code
    (tmp_path / "empty").mkdir()
    assert adapters_main(["folder", "--root", str(tmp_path / "empty"), "--out", str(out)]) == 1


def test_probe_turns_undecodable_videos_into_errors(tmp_path):
    root = tmp_path / "hdtf"
    make_videos(root, "good.mp4")
    (root / "bad.mp4").write_bytes(b"this is not a video")
    for name in ("good", "bad"):
        (root / f"{name}.txt").write_text("a person", "utf-8")
    clips, report = run("folder", root, tmp_path, probe=True)
    assert set(clips) == {"good"}
    assert "bad.mp4" in sources(report["errors"])


@pytest.mark.parametrize("name", ["facevid1k", "celebvhq", "celebvtext", "folder"])
def test_every_adapter_survives_an_empty_root(tmp_path, name):
    (tmp_path / "root").mkdir()
    _, report = run(name, tmp_path / "root", tmp_path)
    assert report["clips_written"] == 0
    assert report["clips_found"] == report["annotation_errors"] + report["clips_missing_on_disk"]


# ----------------------------------------------------------------------------- EasyAnimate metadata (DH-FaceVid-1K)


def easyanimate_root(tmp_path, make_video):
    """A data root in the authors' EasyAnimate layout: real mp4s (make_video), a png, side-car files and a
    metadata JSON mixing good entries with every kind of bad one."""
    root = tmp_path / "dh_facevid"
    talking_head = "videos/abc123XYZ_S100_E250_L10_T20_R300_B280.mp4"  # TalkingHead-1KH-style name: opaque
    for name in ("videos/00001.mp4", talking_head, "videos/untyped.mp4", "videos/dup.mp4"):
        make_video(f"dh_facevid/{name}", num_frames=6)
    outside, _ = make_video("elsewhere/absolute.mp4", num_frames=6)
    (root / "images").mkdir()
    Image.fromarray(smooth_frames(1, 24, 32)[0]).save(root / "images" / "face.png")
    (root / "audio_emb").mkdir()
    (root / "audio_emb" / "00001.pt").write_bytes(b"stand-in side-car")
    entries = [
        {"file_path": "videos/00001.mp4", "text": "asian male, 20s, talking", "type": "video", "width": 32,
         "height": 32, "audio_emb_path": "audio_emb/00001.pt", "emotion": "neutral"},
        {"file_path": talking_head, "text": "a woman smiling", "type": "video",
         "pose_video_path": "pose/missing.mp4"},
        {"file_path": str(outside), "text": "absolute path", "type": "video", "id": 17},
        {"file_path": "videos/untyped.mp4", "text": ["no type given", "second caption"]},
        {"file_path": "images/face.png", "text": "a still face", "type": "image"},
        {"file_path": "videos/dup.mp4", "text": "first", "type": "video"},
        {"file_path": "videos/dup.mp4", "text": "second", "type": "video"},
        {"file_path": "videos/gone.mp4", "text": "not on disk", "type": "video"},
        "not an object",
        {"text": "no path"},
        {"file_path": 42, "text": "path is a number"},
        {"file_path": "videos/00001.mp4", "text": "x", "type": "audio"},
        {"file_path": "videos/00001.mp4", "type": "video"},
        {"file_path": "videos/00001.mp4", "text": "x", "type": "video", "width": "512"},
    ]
    write_json(root / "metadata.json", entries)
    return root, outside


def test_easyanimate_metadata(tmp_path, make_video):
    root, outside = easyanimate_root(tmp_path, make_video)
    clips, report = run("easyanimate", root, tmp_path, probe=True)
    assert set(clips) == {"videos__00001", "videos__abc123XYZ_S100_E250_L10_T20_R300_B280", "17",
                          "videos__untyped", "videos__dup"}
    first = clips["videos__00001"]
    assert first.captions == ["asian male, 20s, talking"] and first.attributes == {"emotion": "neutral"}
    assert (first.extra["width"], first.extra["height"], first.extra["type"]) == (32, 32, "video")
    assert first.extra["sidecars"] == {"audio_emb_path": str((root / "audio_emb" / "00001.pt").resolve())}
    assert first.fps == pytest.approx(12.0)  # probed: the file really decodes
    assert Path(clips["17"].video).resolve() == outside.resolve()
    assert clips["videos__untyped"].captions == ["no type given", "second caption"]
    assert clips["videos__dup"].captions == ["first"]

    assert report["clips_found"] == 14 and report["clips_written"] == 5
    assert report["clips_missing_on_disk"] == 1 and "gone.mp4" in sources(report["missing"])
    assert report["clips_skipped"] == 1 and "image entry 'images/face.png'" in sources(report["skipped"])
    errors = sources(report["errors"])
    assert report["annotation_errors"] == 7
    for reason in ("duplicate clip id 'videos__dup'", "[8]: expected a JSON object per entry, got str",
                   "[9]: no 'file_path'", "[10]: 'file_path' must be a non-empty path string, got 42",
                   "[11]: 'type' must be one of video, image, got 'audio'", "[12]: no caption",
                   "[13]: 'width' must be a positive integer, got '512'"):
        assert reason in errors, reason
    notes = " | ".join(report["notes"])
    assert "1 entries had no 'type'" in notes and "pose_video_path 'pose/missing.mp4'" in notes


def test_easyanimate_keeps_images_as_one_frame_clips(tmp_path, make_video):
    root, _ = easyanimate_root(tmp_path, make_video)
    clips, report = run("easyanimate", root, tmp_path, probe=True, keep_images=True)
    image = clips["images__face"]
    assert image.extra["type"] == "image" and report["clips_skipped"] == 0
    frames = read_frames(image.video, [0])
    assert frames.shape == (1, 24, 32, 3)


def test_easyanimate_cli_and_unusable_metadata(tmp_path, make_video, capsys):
    root, _ = easyanimate_root(tmp_path, make_video)
    out = tmp_path / "cli" / "manifest.jsonl"
    assert adapters_main(["easyanimate", "--root", str(root), "--out", str(out), "--keep-images"]) == 0
    assert "skipped: 0" in capsys.readouterr().out and len(read_manifest(out)[0]) == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    assert adapters_main(["easyanimate", "--root", str(empty), "--out", str(tmp_path / "e.jsonl")]) == 2
    assert "expected one metadata .json" in capsys.readouterr().err
    write_json(empty / "meta.json", {"file_path": "a.mp4"})
    _, report = run("easyanimate", empty, tmp_path)
    assert "expected a JSON list of entries, got dict" in sources(report["errors"])
