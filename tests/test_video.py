import wave

import numpy as np
import pytest
import torch
from conftest import smooth_frames
from PIL import Image

from data import video
from data.video import (
    VideoDecodeError,
    frames_to_tensor,
    probe_video,
    read_frames,
    save_contact_sheet,
    tensor_to_frames,
    write_video,
)


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_mp4_round_trip_and_probe(make_video):
    path, frames = make_video("a.mp4", num_frames=16, height=32, width=48, fps=12.0)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (16, 12.0, 48, 32)
    decoded = read_frames(path, range(16))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert mean_abs_error(decoded, frames) < 8


def test_read_frames_keeps_requested_order_and_repeats(make_video):
    path, frames = make_video()
    decoded = read_frames(path, [5, 2, 2, 9])
    for got, index in zip(decoded, [5, 2, 2, 9]):
        assert mean_abs_error(got, frames[index]) < mean_abs_error(got, frames[index + 1]) - 1


def test_gif_round_trip(tmp_path):
    frames = smooth_frames(6, 24, 32)
    path = write_video(tmp_path / "sub" / "a.gif", frames, fps=10)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (6, 32, 24)
    assert info.fps == pytest.approx(10, rel=0.05)
    assert mean_abs_error(read_frames(path, range(6)), frames) < 8
    with Image.open(path) as image:
        assert image.info.get("loop") == 0 and image.n_frames == 6


def test_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_frames(4, 15, 21)
    path = write_video(tmp_path / "odd.mp4", frames, fps=8)
    decoded = read_frames(path, range(4))
    assert decoded.shape == (4, 16, 22, 3)
    assert mean_abs_error(decoded[:, :15, :21], frames) < 8


def test_write_is_atomic(tmp_path, monkeypatch):
    def crash_midway(path, frames, fps, crf):
        path.write_bytes(b"half a video")
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "_write_mp4", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        write_video(tmp_path / "a.mp4", smooth_frames(2, 8, 8), fps=8)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary file


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="extension"):
        write_video(tmp_path / "a.avi", smooth_frames(2, 8, 8), fps=8)


def _write_wav(path):
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(b"\0" * 1600)


@pytest.mark.parametrize("kind, reason", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("text", "not a readable video"),
    ("truncated", "not a readable video"),
    ("audio", "no video stream"),
])
def test_unreadable_files_raise_naming_the_file(make_video, tmp_path, kind, reason):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.touch()
    elif kind == "text":
        path.write_text("definitely not a video\n" * 50)
    elif kind == "truncated":
        good, _ = make_video("good.mp4")
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "audio":
        path = tmp_path / "audio.wav"
        _write_wav(path)
    for read in (probe_video, lambda p: read_frames(p, [0])):
        with pytest.raises(VideoDecodeError, match=reason) as err:
            read(path)
        assert str(path) in str(err.value)


def test_too_short_says_how_many_frames(make_video):
    path, _ = make_video(num_frames=16)
    with pytest.raises(VideoDecodeError, match=r"decoded 16 frames, needs 21") as err:
        read_frames(path, [0, 20])
    assert str(path) in str(err.value)


def test_seeking_matches_decoding_from_the_start(make_video, monkeypatch):
    path, frames = make_video("long.mp4", num_frames=120, fps=12.0)  # a keyframe every 24 frames
    wanted = [100, 103, 106, 109, 112]
    seeks = []
    real_seek = video._decode_after_seek

    def recording_seek(*args):
        seeks.append(real_seek(*args))
        return seeks[-1]

    monkeypatch.setattr(video, "_decode_after_seek", recording_seek)
    seeked = read_frames(path, wanted)
    assert seeks and seeks[0] is not None  # the seek path was taken and trusted

    monkeypatch.setattr(video, "SEEK_MIN_FRAMES", 10**9)
    assert np.array_equal(seeked, read_frames(path, wanted))
    for got, index in zip(seeked, wanted):
        assert mean_abs_error(got, frames[index]) < mean_abs_error(got, frames[index - 4])


def test_seek_past_the_end_reports_too_short(make_video):
    path, _ = make_video("long.mp4", num_frames=60)
    with pytest.raises(VideoDecodeError, match="decoded 60 frames, needs 71"):
        read_frames(path, [50, 70])


def test_resize_and_center_crop(tmp_path):
    frames = np.zeros((3, 48, 80, 3), np.uint8)
    frames[:, :, 16:64] = (0, 200, 0)  # the centered 48x48 square is green, the sides red
    frames[:, :, :16] = frames[:, :, 64:] = (200, 0, 0)
    path = write_video(tmp_path / "wide.mp4", frames, fps=8)
    small = read_frames(path, [0, 2], resolution=24)
    assert small.shape == (2, 24, 24, 3)
    assert small[..., 1].mean() > 180 and small[..., 0].mean() < 20


def test_tensor_conversions_round_trip():
    frames = smooth_frames(5, 12, 10)
    clip = frames_to_tensor(frames)
    assert clip.shape == (3, 5, 12, 10) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert np.array_equal(tensor_to_frames(clip), frames)
    assert tensor_to_frames(torch.full((3, 1, 2, 2), 3.0)).max() == 255  # out of range is clipped
    with pytest.raises(ValueError, match=r"\(3, F, H, W\)"):
        tensor_to_frames(torch.zeros(5, 3, 12, 10))


def test_contact_sheet_size(tmp_path):
    videos = [smooth_frames(10, 16, 24) for _ in range(3)]
    plain = save_contact_sheet(tmp_path / "plain.png", videos, max_frames=4, min_side=0)
    with Image.open(plain) as image:
        assert image.format == "PNG" and image.size == (4 * 24, 3 * 16)
    labels = ["a", "b", "a long label " * 10]
    labelled = save_contact_sheet(tmp_path / "labelled.png", videos, labels=labels, max_frames=4, min_side=0)
    with Image.open(labelled) as image:
        assert image.width == 4 * 24 and image.height > 3 * 16
    short = save_contact_sheet(tmp_path / "short.png", [smooth_frames(2, 16, 24)], max_frames=8, min_side=0)
    with Image.open(short) as image:
        assert image.size == (2 * 24, 16)
    # Small frames (the 32 px demo) are enlarged by a whole factor, each pixel a block of equal pixels.
    small = smooth_frames(2, 16, 24)
    enlarged = save_contact_sheet(tmp_path / "enlarged.png", [small], max_frames=2, min_side=40)
    with Image.open(enlarged) as image:
        sheet = np.asarray(image.convert("RGB"))
    assert sheet.shape == (3 * 16, 2 * 3 * 24, 3)
    assert np.array_equal(sheet[::3, :72:3], small[0]) and np.array_equal(sheet[2::3, 2:72:3], small[0])
