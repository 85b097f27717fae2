"""Video I/O (PyAV for mp4 and anything FFmpeg reads, Pillow for gif and png) and tensor conversions.

Conventions used across FaceVid:

- frames on disk / in numpy: ``uint8`` array ``(T, H, W, 3)``, RGB;
- a clip as a model tensor: ``float32`` ``(3, F, H, W)`` in ``[-1, 1]``, i.e. one item of diffusers'
  ``(B, C, F, H, W)`` video layout. `frames_to_tensor` / `tensor_to_frames` convert between the two.

Every failure to read a video is a `VideoDecodeError` whose message names the file and the reason, so a
training run can skip the clip and report it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Below this first index, decoding from the start is about as cheap as a seek and always exact.
SEEK_MIN_FRAMES = 48


class VideoDecodeError(Exception):
    """A video could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class VideoInfo:
    num_frames: int
    fps: float | None  # None when the container states no frame rate
    width: int
    height: int


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path` and moves it into place only if the block succeeds.

    The temporary name keeps the extension because FFmpeg and Pillow pick the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3) with T >= 1, "
                         f"got {frames.dtype} {frames.shape}")
    return frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write uint8 frames ``(T, H, W, 3)`` to ``.mp4`` (H.264, yuv420p) or ``.gif`` (looping).

    yuv420p needs an even width and height: odd sizes are padded by repeating the last row / column,
    so the mp4 can come back one pixel larger than the input. `crf` is x264's quality (lower = better;
    18 is visually lossless). The file appears under its final name only once it is complete.
    """
    frames = _check_frames(frames)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"{path}: unsupported video extension {suffix!r} (use .mp4 or .gif)")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with _atomic_output(path) as tmp:
        if suffix == ".mp4":
            _write_mp4(tmp, frames, fps, crf)
        else:
            _write_gif(tmp, frames, fps)
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(float(fps)).limit_denominator(100_000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = max(1, round(2 * fps))  # a keyframe every ~2 s: cheap seeking
        # veryfast: same quality at a given crf, ~3x faster to encode than the default on tiny clips.
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    # A gif is a preview format: Pillow merges identical consecutive frames (adding up their durations).
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def open_video_stream(path: str | os.PathLike):
    """Opens `path` and yields (container, first video stream); every failure is a VideoDecodeError."""
    path = str(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoDecodeError(path, f"not a readable video ({err.__class__.__name__}: {err})") from err
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoDecodeError(path, f"no video stream (streams: {kinds})")
        try:
            yield container, container.streams.video[0]
        except av.FFmpegError as err:
            raise VideoDecodeError(path, f"corrupt video data ({err.__class__.__name__}: {err})") from err


def _stream_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and size, from the container's metadata (or by demuxing, never decoding)."""
    with open_video_stream(path) as (container, stream):
        num_frames = stream.frames
        if not num_frames:  # e.g. gif, webm: no frame count in the header, but one packet per frame
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        if not num_frames:
            raise VideoDecodeError(path, "video stream has no frames")
        context = stream.codec_context
        return VideoInfo(num_frames=num_frames, fps=_stream_fps(stream), width=context.width,
                         height=context.height)


def read_frames(path: str | os.PathLike, frame_indices: Sequence[int], resolution: int | None = None
                ) -> np.ndarray:
    """Decode the frames at `frame_indices` (any order, repeats allowed) as uint8 ``(N, H, W, 3)``.

    Decoding stops after the last needed frame; when the first needed frame is far into a
    constant-frame-rate video, it seeks to the keyframe before it (and falls back to decoding from
    the start whenever timestamps do not line up). With `resolution`, frames are center-cropped to a
    square and resized to ``resolution x resolution`` (same as resize-shortest-side + center crop).
    Raises VideoDecodeError for an unreadable / corrupt file or one with too few frames.
    """
    indices = [int(i) for i in frame_indices]
    if not indices:
        raise ValueError("frame_indices is empty")
    if min(indices) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
    wanted = set(indices)
    with open_video_stream(path) as (container, stream):
        decoded = None
        if min(wanted) >= SEEK_MIN_FRAMES:
            decoded = _decode_after_seek(container, stream, wanted)
            if decoded is None:
                container.seek(0)  # rewind (and flush the decoder) after the failed attempt
        if decoded is None:
            decoded = _decode_from_start(path, container, stream, wanted)
    frames = np.stack([decoded[i] for i in indices])
    if resolution is not None:
        frames = center_crop_resize(frames, resolution)
    return frames


def _decode_from_start(path, container, stream, wanted: set[int]) -> dict[int, np.ndarray]:
    decoded: dict[int, np.ndarray] = {}
    last = max(wanted)
    num_decoded = 0
    for index, frame in enumerate(container.decode(stream)):
        num_decoded = index + 1
        if index in wanted:
            decoded[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            return decoded
    raise VideoDecodeError(path, f"too short: decoded {num_decoded} frames, needs {last + 1} "
                                 f"(frame index {last})")


def _decode_after_seek(container, stream, wanted: set[int]) -> dict[int, np.ndarray] | None:
    """Seek near min(wanted) and map timestamps to frame indices; None when that is not reliable.

    Only for constant frame rate (average rate == nominal rate): then index = (pts - start) * fps.
    The mapping is trusted only if the first decoded frame lands at or before the first wanted one
    and indices then advance by exactly one per frame; anything else means "decode from the start".
    """
    rate = stream.average_rate
    if not rate or rate != stream.base_rate or stream.time_base is None:
        return None
    start_pts = stream.start_time or 0
    first, last = min(wanted), max(wanted)
    target_pts = start_pts + int((Fraction(first) / rate) / stream.time_base)
    try:
        container.seek(target_pts, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:
        return None
    decoded: dict[int, np.ndarray] = {}
    previous = None
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        index = round((frame.pts - start_pts) * stream.time_base * rate)
        if (previous is None and index > first) or (previous is not None and index != previous + 1):
            return None
        previous = index
        if index in wanted:
            decoded[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            return decoded
    return None  # ran out of frames: let the sequential decode count them and report


def center_crop_resize(frames: np.ndarray, resolution: int) -> np.ndarray:
    """Center-crop uint8 ``(T, H, W, 3)`` to a square and resize it to ``resolution`` (antialiased)."""
    _, height, width, _ = frames.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frames = frames[:, top:top + side, left:left + side]
    if side == resolution:
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# ----------------------------------------------------------------------------- tensors


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(F, H, W, 3)`` -> float32 ``(3, F, H, W)`` in ``[-1, 1]``."""
    frames = _check_frames(frames)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """float ``(3, F, H, W)`` in ``[-1, 1]`` (values outside are clipped) -> uint8 ``(F, H, W, 3)``."""
    video = torch.as_tensor(video).detach()
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a clip tensor of shape (3, F, H, W), got {tuple(video.shape)}")
    video = video.float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).contiguous().numpy()


# ----------------------------------------------------------------------------- contact sheets


def _wrap_text(text: str, font, max_width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines or [""]


def _enlarge_small(frames: np.ndarray, min_side: int) -> np.ndarray:
    """Whole-factor nearest-neighbour enlargement of a video whose shorter side is under `min_side`."""
    side = min(frames.shape[1:3])
    if side >= min_side:
        return frames
    factor = math.ceil(min_side / side)
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def save_contact_sheet(path: str | os.PathLike, videos: Sequence[np.ndarray],
                       labels: Sequence[str] | None = None, max_frames: int = 8, min_side: int = 128) -> Path:
    """PNG grid: one row per video, up to `max_frames` evenly spaced frames as columns.

    Videos of different sizes are centered in cells of the largest size. With `labels`, each row gets
    its (word-wrapped) label above it in a dark band. Videos whose shorter side is under `min_side`
    are enlarged by a whole factor, nearest-neighbour (each pixel becomes a block: nothing invented).
    """
    videos = [_check_frames(v) for v in videos]
    if not videos:
        raise ValueError("no video to put on the contact sheet")
    videos = [_enlarge_small(v, min_side) for v in videos]
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"{len(labels)} labels for {len(videos)} videos")
    cell_h = max(v.shape[1] for v in videos)
    cell_w = max(v.shape[2] for v in videos)
    columns = min(max_frames, max(len(v) for v in videos))
    sheet_w = columns * cell_w

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 3
    label_lines = [_wrap_text(label, font, sheet_w - 4, measure) for label in labels] if labels else None

    rows = []
    for row, video in enumerate(videos):
        picks = np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int)
        strip = np.zeros((cell_h, sheet_w, 3), np.uint8)
        h, w = video.shape[1:3]
        top, left = (cell_h - h) // 2, (cell_w - w) // 2
        for column, frame_index in enumerate(picks):
            x0 = column * cell_w + left
            strip[top:top + h, x0:x0 + w] = video[frame_index]
        image = Image.fromarray(strip)
        if label_lines:
            lines = label_lines[row]
            banded = Image.new("RGB", (sheet_w, cell_h + line_h * len(lines) + 2), (24, 24, 24))
            draw = ImageDraw.Draw(banded)
            for k, line in enumerate(lines):
                draw.text((2, 1 + k * line_h), line, fill=(235, 235, 235), font=font)
            banded.paste(image, (0, banded.height - cell_h))
            image = banded
        rows.append(image)

    sheet = Image.new("RGB", (sheet_w, sum(r.height for r in rows)))
    y = 0
    for image in rows:
        sheet.paste(image, (0, y))
        y += image.height
    path = Path(path)
    with _atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
