import json

import numpy as np
import pytest

from data import synth
from data.manifest import read_manifest
from data.video import probe_video, read_frames

SIZE = 64
# Plain look, so that skin pixels are easy to find: light skin on blue, black short hair, nothing on the face.
PLAIN = {"skin_tone": "light", "hair_color": "black", "hair_length": "short", "glasses": "no glasses",
         "beard": "no beard", "emotion": "neutral", "background": "blue studio", "lighting": "bright",
         "action": "still"}


def render(seed: int = 0, **changes) -> np.ndarray:
    return synth.render_clip({**PLAIN, **changes}, num_frames=16, resolution=SIZE, seed=seed)


def skin_centroids(video: np.ndarray) -> np.ndarray:
    """(T, 2) mean (y, x) of the face's skin pixels in every frame."""
    distance = np.abs(video.astype(np.float32) - np.float32(synth.SKIN_RGB["light"])).max(axis=-1)
    mask = distance < 20
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    count = mask.sum(axis=(1, 2))
    return np.stack([(mask * ys).sum(axis=(1, 2)) / count, (mask * xs).sum(axis=(1, 2)) / count], axis=1)


def changing_pixels(video: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels that change noticeably at some point of the clip."""
    return (video.astype(np.int16).max(axis=0) - video.astype(np.int16).min(axis=0)).max(axis=-1) > 40


def test_render_is_deterministic_and_clips_differ():
    clip = render(seed=3, action="talking")
    assert clip.shape == (16, SIZE, SIZE, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, render(seed=3, action="talking"))
    assert not np.array_equal(clip, render(seed=4, action="talking"))


def test_every_attribute_value_renders_differently():
    base = render(seed=1)
    for name, values in synth.ATTRIBUTES.items():
        for value in values:
            if value != PLAIN[name]:
                changed = np.abs(render(seed=1, **{name: value}).astype(int) - base).max(axis=-1) > 40
                assert changed.sum() >= 16, (name, value)


def test_render_rejects_unknown_values():
    with pytest.raises(ValueError, match="hair_color"):
        render(hair_color="green")


def test_still_is_static_and_talking_moves_the_mouth_below_the_blinking_eyes():
    assert not changing_pixels(render(action="still")).any()
    for seed in range(3):
        talking = changing_pixels(render(seed, action="talking"))
        blinking = changing_pixels(render(seed, action="blinking"))
        assert 4 < talking.sum() < 0.05 * SIZE * SIZE and 4 < blinking.sum() < 0.05 * SIZE * SIZE
        mouth_y, eyes_y = np.argwhere(talking)[:, 0].mean(), np.argwhere(blinking)[:, 0].mean()
        assert mouth_y > eyes_y + 0.1 * SIZE  # same seed, same face: the mouth is well below the eyes


def test_aligned_motion_puts_every_clip_of_an_action_in_step():
    def curves(action, aligned):  # the pose curve an action drives, for 4 clips of different seeds
        key = {"talking": "mouth", "blinking": "eyes", "nodding": "nod"}[action]
        return [synth._motion(action, 16, np.random.default_rng(seed), aligned)[key].ravel() for seed in range(4)]

    for action in ("talking", "blinking", "nodding"):
        aligned, free = curves(action, True), curves(action, False)
        # Aligned: one rhythm from the rest pose (a talking mouth's depth still varies per clip).
        assert all(np.allclose(c / c.max(), aligned[0] / aligned[0].max(), atol=1e-6) for c in aligned), action
        assert not all(np.allclose(c / c.max(), free[0] / free[0].max(), atol=1e-2) for c in free), action
    assert curves("talking", True)[0][0] == 0 and curves("nodding", True)[0][0] == 0  # mouth shut, head level
    # The rest of the clip is the same person and scene either way.
    attributes = {**synth.sample_attributes(np.random.default_rng(3)), "action": "still"}
    np.testing.assert_array_equal(synth.render_clip(attributes, 4, 32, 7, aligned_motion=True),
                                  synth.render_clip(attributes, 4, 32, 7))


def test_blinks_survive_every_other_frame_sampling():
    for seed in range(5):
        video = render(seed, action="blinking")
        for offset in (0, 1):
            assert changing_pixels(video[offset::2]).any(), (seed, offset)


def test_nodding_moves_the_face_vertically():
    for seed in range(3):
        centroids = skin_centroids(render(seed, action="nodding"))
        assert np.ptp(centroids[:, 0]) > 0.05 * SIZE
        assert np.ptp(centroids[:, 1]) < 0.02 * SIZE


def test_turning_left_and_right_move_the_face_opposite_ways():
    for seed in range(3):
        left = skin_centroids(render(seed, action="turning left"))[:, 1]
        right = skin_centroids(render(seed, action="turning right"))[:, 1]
        assert left[-1] - left[0] < -0.03 * SIZE
        assert right[-1] - right[0] > 0.03 * SIZE
        # Steadily, not back and forth: each quarter of the clip is further along than the one before.
        assert np.all(np.diff(left.reshape(4, -1).mean(axis=1)) < 0)
        assert np.all(np.diff(right.reshape(4, -1).mean(axis=1)) > 0)


def test_captions_state_every_attribute():
    rng = np.random.default_rng(0)
    captions = set()
    for _ in range(200):
        attributes = synth.sample_attributes(rng)
        caption = synth.caption_for(attributes, rng)
        captions.add(caption)
        assert f"{attributes['hair_length']} {attributes['hair_color']} hair" in caption
        assert attributes["skin_tone"] in caption and f"{attributes['lighting']} light" in caption
        for name, phrases in synth.PHRASES.items():
            assert any(phrase in caption for phrase in phrases[attributes[name]]), (name, caption)
    # Several sentence structures for the same attributes (told apart by how they start).
    openings = {tuple(synth.caption_for(PLAIN, np.random.default_rng(i)).split()[:2]) for i in range(50)}
    assert len(openings) >= 4


def test_generate_writes_a_readable_reproducible_dataset(tmp_path):
    kwargs = {"num_clips": 5, "num_frames": 8, "resolution": 32, "fps": 8.0, "seed": 7, "progress": False}
    manifest = synth.generate(tmp_path / "a", **kwargs)
    records, skipped = read_manifest(manifest)
    assert len(records) == 5 and not skipped
    assert len({r.video for r in records}) == 5
    for record in records:
        assert set(record.attributes) == set(synth.ATTRIBUTES) and record.fps == 8.0
        assert len(record.captions) == 2
        info = probe_video(record.video)
        assert (info.num_frames, info.width, info.height, info.fps) == (8, 32, 32, 8.0)
        assert read_frames(record.video, range(8)).shape == (8, 32, 32, 3)

    again = synth.generate(tmp_path / "b", **kwargs, workers=2)
    assert manifest.read_text() == again.read_text()  # same (seed, i): same attributes and captions
    for first, second in zip(records, read_manifest(again)[0]):
        difference = read_frames(first.video, range(8)).astype(int) - read_frames(second.video, range(8))
        assert np.abs(difference).max() <= 1


def test_generate_reuses_what_is_on_disk(tmp_path):
    kwargs = {"num_clips": 3, "num_frames": 4, "resolution": 32, "seed": 0, "progress": False}
    manifest = synth.generate(tmp_path, **kwargs)
    info = json.loads((tmp_path / "synth_info.json").read_text())
    assert info["num_clips"] == 3 and info["seed"] == 0
    clips = sorted((tmp_path / "clips").glob("*.mp4"))
    stamps = [clip.stat().st_mtime_ns for clip in clips]

    synth.generate(tmp_path, **kwargs)  # same arguments: nothing rewritten
    assert [clip.stat().st_mtime_ns for clip in clips] == stamps

    clips[1].unlink()  # an interrupted run: only the missing clip is drawn again
    synth.generate(tmp_path, **kwargs)
    assert clips[1].is_file() and clips[0].stat().st_mtime_ns == stamps[0]

    synth.generate(tmp_path, **kwargs, aligned_motion=True)  # other timing: every clip drawn again
    assert json.loads((tmp_path / "synth_info.json").read_text())["aligned_motion"] is True
    assert all(clip.stat().st_mtime_ns != stamp for clip, stamp in zip(clips, stamps))

    synth.generate(tmp_path, **{**kwargs, "num_clips": 2, "num_frames": 6})  # other arguments: start over
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["synth_00000.mp4", "synth_00001.mp4"]
    assert len(read_manifest(manifest)[0]) == 2 and probe_video(clips[0]).num_frames == 6


def test_command_line(tmp_path, capsys):
    synth.main(["--out", str(tmp_path), "--num-clips", "2", "--frames", "4", "--resolution", "32",
                "--fps", "6", "--seed", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "manifest.jsonl")
    assert len(read_manifest(tmp_path / "manifest.jsonl")[0]) == 2
