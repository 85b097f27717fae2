"""One raw video -> face clips, streaming: decode, resample, cut into shots, track, crop, filter, write.

Memory is bounded whatever the video's length: the decoder hands over one frame at a time, at most
`detect_every` full frames wait for the next detection, and a clip under construction holds at most
``max_seconds * fps`` crops of ``out_size`` pixels (10 s at 25 fps and 256 px: 49 MB).

Frames flow like this: every frame is compared with the previous one for a shot cut; every
`detect_every`-th frame (a keyframe) runs the face detector. One face matching the track extends the
clip, and the frames since the previous keyframe get crop windows blended between the two smoothed
keyframe windows. No face, several faces, a face that jumps, a cut, or the length limit ends the
clip; the filters then keep it (written to clips/) or drop it, counting the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data.curate.captions import Captioner, background_colour, draft_caption
from data.curate.faces import CropWindow, FaceDetector, FaceTrack, crop_square, iou
from data.curate.frames import Frame, iter_frames, resample
from data.curate.quality import (
    ShotBoundaryDetector,
    border_fraction,
    brightness,
    camera_shift,
    face_in_crop,
    face_patch,
    mouth_motion,
    sharpness,
    thumbnail,
)
from data.manifest import ClipRecord
from data.video import VideoDecodeError, write_video

# Reasons a stretch of video is dropped (report keys).
NO_FACE = "no face"
MULTIPLE_FACES = "multiple faces"
FACE_JUMP = "face jumped (new face or missed cut)"
TOO_SHORT = "too short"
FACE_TOO_SMALL = "face too small"
BLURRY = "blurry"
TOO_DARK = "too dark"
TOO_BRIGHT = "too bright"
BLACK_BORDERS = "black borders"
CAMERA_MOTION = "too much camera motion"
FACE_MOTION = "too much face motion"

# Faces down to this share of min_face are searched for (so that faces just under the limit are
# reported as too small); narrower detections are ignored, neither tracked nor counted as a second face.
DETECTABLE_FACE_SHARE = 0.8


@dataclass
class CurationConfig:
    out_size: int = 256  # side of the square clips written, pixels
    fps: float = 25.0  # frame rate of the clips written (and of the analysis)
    detect_every: int = 5  # run the face detector on every k-th frame, interpolate in between
    min_face: float = 64.0  # face width in source pixels
    min_seconds: float = 2.0
    max_seconds: float = 10.0  # longer face shots are split into several clips
    min_sharpness: float = 40.0  # variance of the Laplacian of the face at 96x96, full contrast
    min_brightness: float = 40.0  # mean luma of the crop, 0-255
    max_brightness: float = 215.0
    max_border: float = 0.06  # share of the crop's height or width that is black bars
    max_camera_motion: float = 0.25  # frame widths per second
    max_face_motion: float = 0.6  # crop sides per second
    shot_threshold: float = 0.35  # colour-histogram (Bhattacharyya) distance that marks a cut
    crop_scale: float = 2.2  # crop side / face width: face, hair and shoulders
    crop_drop: float = 0.3  # crop centre below the face centre, in face heights (for the shoulders)
    smoothing: float = 0.5  # EMA weight of each new detection in the crop window
    iou_threshold: float = 0.3  # a detection continues the track if it overlaps it this much
    max_missed: int = 2  # keyframes without a detection that the track bridges
    detector: str = "haar"  # or 'package.module:factory'
    captioner: str | None = None  # 'package.module:factory', or None for drafted captions only

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipDraft:
    """A clip under construction: its crops and the measurements taken at its keyframes."""

    start_time: float
    crops: list[np.ndarray] = field(default_factory=list)
    face_widths: list[float] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)
    brightness: list[float] = field(default_factory=list)
    warmth: list[float] = field(default_factory=list)
    borders: list[float] = field(default_factory=list)
    face_share: list[float] = field(default_factory=list)
    face_offset: list[float] = field(default_factory=list)
    mouth_motion: list[float] = field(default_factory=list)
    camera_speeds: list[float] = field(default_factory=list)
    face_speeds: list[float] = field(default_factory=list)
    last_key: tuple | None = None  # (time, crop, thumbnail, window) of the last keyframe


def _mean(values: list[float], default: float = 0.0) -> float:
    return float(np.mean(values)) if values else default


class VideoCurator:
    """The per-video state machine; feed it constant-rate frames, then call finish()."""

    def __init__(self, config: CurationConfig, detector: FaceDetector, on_clip):
        self.cfg = config
        self.detector = detector
        self.on_clip = on_clip  # on_clip(crops, stats) for every clip that passes the filters
        self.shots = ShotBoundaryDetector(config.shot_threshold)
        self.pending: list[tuple[Frame, np.ndarray]] = []  # frames since the last keyframe, + thumbnails
        self.track: FaceTrack | None = None
        self.extra_face_streak = 0  # keyframes in a row with more than one face
        self.clip: ClipDraft | None = None
        self.max_frames = max(1, round(config.max_seconds * config.fps))
        self.dropped_seconds: Counter = Counter()
        self.dropped_clips: Counter = Counter()
        self.seconds = 0.0

    # --------------------------------------------------------------------- stream events

    def feed(self, frame: Frame) -> None:
        self.seconds += 1.0 / self.cfg.fps
        thumb = thumbnail(frame.rgb)
        if self.shots.is_cut(thumb):
            self._keyframe()  # settles the last frames of the shot that just ended
            self._close_clip()
            self.track = None
            self.extra_face_streak = 0
        self.pending.append((frame, thumb))
        if len(self.pending) >= self.cfg.detect_every:
            self._keyframe()

    def finish(self) -> None:
        self._keyframe()
        self._close_clip()

    # --------------------------------------------------------------------- keyframes

    def _drop(self, frames: list, reason: str) -> None:
        if frames:
            self.dropped_seconds[reason] += len(frames) / self.cfg.fps

    def _end_track(self, frames: list, reason: str) -> None:
        self._drop(frames, reason)
        self._close_clip()
        self.track = None

    def _keyframe(self) -> None:
        frames, self.pending = self.pending, []
        if not frames:
            return
        key = frames[-1][0]
        min_width = DETECTABLE_FACE_SHARE * self.cfg.min_face
        faces = [box for box in self.detector(key.rgb) if box[2] >= min_width]
        if self.track is not None:  # the face continuing the track first
            faces.sort(key=lambda box: iou(box, self.track.face), reverse=True)
        # A second face must show on two keyframes in a row: single-keyframe ones are mostly false
        # positives of the detector, and dropping the shot for them would waste good footage.
        self.extra_face_streak = self.extra_face_streak + 1 if len(faces) > 1 else 0
        if len(faces) > 1 and (self.track is None or self.extra_face_streak >= 2):
            return self._end_track(frames, MULTIPLE_FACES)
        if not faces:
            if self.track is not None and self.track.missed < self.cfg.max_missed:
                self.track.missed += 1  # detectors blink: hold the window for a while
                return self._extend(frames, self.track.window, self.track.window, self.track.face)
            return self._end_track(frames, NO_FACE)
        face = faces[0]
        window = CropWindow.around_face(face, self.cfg.crop_scale, self.cfg.crop_drop)
        if self.track is not None and iou(face, self.track.face) < self.cfg.iou_threshold:
            self._end_track(frames[:-1], FACE_JUMP)  # whose face the frames in between show is unknown
            frames = frames[-1:]
        if self.track is None:
            self.track = FaceTrack(face, window)
            return self._extend(frames, window, window, face)
        start = self.track.window
        self.track.update(face, window, self.cfg.smoothing)
        self._extend(frames, start, self.track.window, face)

    def _extend(self, frames: list, start: CropWindow, end: CropWindow, face) -> None:
        """Crop `frames` with windows moving from `start` to `end`, measure the keyframe (the last)."""
        if self.clip is not None and len(self.clip.crops) + len(frames) > self.max_frames:
            self._close_clip()
        if self.clip is None:
            self.clip = ClipDraft(start_time=frames[0][0].time)
        for position, (frame, _) in enumerate(frames, start=1):
            window = start.blend(end, position / len(frames))
            self.clip.crops.append(crop_square(frame.rgb, window, self.cfg.out_size))
        key, key_thumb = frames[-1]
        self._measure(self.clip, key, key_thumb, end, face)

    def _measure(self, clip: ClipDraft, key: Frame, thumb: np.ndarray, window: CropWindow, face) -> None:
        crop = clip.crops[-1]
        size = self.cfg.out_size
        height, width = key.rgb.shape[:2]
        face_box = face_in_crop(face, window, (width, height), size)
        clip.face_widths.append(face[2])
        clip.sharpness.append(sharpness(key.rgb, face))  # the source's sharpness, not our resize's
        clip.brightness.append(brightness(crop))
        clip.warmth.append(float(crop[..., 0].mean()) - float(crop[..., 2].mean()))
        clip.borders.append(border_fraction(crop))
        clip.face_share.append(face_box[2] / size)
        clip.face_offset.append((face_box[0] + face_box[2] / 2) / size - 0.5)
        if clip.last_key is not None:
            last_time, last_crop, last_thumb, last_window = clip.last_key
            elapsed = max(key.time - last_time, 1e-6)
            # Both crops cut at this keyframe's face box: the smoothed crops hold the face still, so what
            # differs is the face itself, not detector jitter.
            clip.mouth_motion.append(mouth_motion(face_patch(last_crop, face_box), face_patch(crop, face_box)))
            clip.camera_speeds.append(camera_shift(last_thumb, thumb) / elapsed)
            moved = np.hypot(window.cx - last_window.cx, window.cy - last_window.cy)
            clip.face_speeds.append(moved / max(window.side, 1.0) / elapsed)
        clip.last_key = (key.time, crop, thumb, window)

    # --------------------------------------------------------------------- clips

    def _close_clip(self) -> None:
        clip, self.clip = self.clip, None
        if clip is None or not clip.crops:
            return
        stats = self._clip_stats(clip)
        reason = self._rejection(stats)
        if reason is not None:
            self.dropped_clips[reason] += 1
            self.dropped_seconds[reason] += stats["seconds"]
            return
        stats["background"] = background_colour(clip.crops[len(clip.crops) // 2])
        self.on_clip(np.stack(clip.crops), stats)

    def _clip_stats(self, clip: ClipDraft) -> dict:
        seconds = len(clip.crops) / self.cfg.fps
        return {
            "start": round(clip.start_time, 3), "seconds": seconds, "frames": len(clip.crops),
            "face_width": float(np.median(clip.face_widths)),
            "sharpness": float(np.median(clip.sharpness)),
            "brightness": _mean(clip.brightness), "warmth": _mean(clip.warmth),
            "border": float(np.median(clip.borders)),
            "face_share": _mean(clip.face_share), "face_offset": _mean(clip.face_offset),
            "mouth_motion": _mean(clip.mouth_motion),
            "camera_motion": _mean(clip.camera_speeds), "face_motion": _mean(clip.face_speeds),
        }

    def _rejection(self, stats: dict) -> str | None:
        cfg = self.cfg
        checks = (
            (TOO_SHORT, stats["seconds"] < cfg.min_seconds - 1e-9),
            (FACE_TOO_SMALL, stats["face_width"] < cfg.min_face),
            (TOO_DARK, stats["brightness"] < cfg.min_brightness),
            (TOO_BRIGHT, stats["brightness"] > cfg.max_brightness),
            (BLURRY, stats["sharpness"] < cfg.min_sharpness),
            (BLACK_BORDERS, stats["border"] > cfg.max_border),
            (CAMERA_MOTION, stats["camera_motion"] > cfg.max_camera_motion),
            (FACE_MOTION, stats["face_motion"] > cfg.max_face_motion),
        )
        return next((reason for reason, failed in checks if failed), None)


# ----------------------------------------------------------------------------- one input file


def clip_prefix(path: str | os.PathLike) -> str:
    """Readable and unique: ASCII part of the file name + a hash of the full path."""
    path = Path(path).resolve()
    readable = re.sub(r"[^A-Za-z0-9-]+", "_", path.stem).strip("_")[:40] or "video"
    return f"{readable}_{hashlib.sha1(str(path).encode('utf-8')).hexdigest()[:8]}"


def _summarise_drops(dropped_seconds: Counter, dropped_clips: Counter) -> str:
    parts = []
    for reason, seconds in dropped_seconds.most_common():
        clips = dropped_clips.get(reason)
        parts.append(f"{reason} {seconds:.1f} s" + (f" ({clips} clip{'s' * (clips > 1)})" if clips else ""))
    return "no usable clip: " + (", ".join(parts) if parts else "no frame decoded")


def _captions(captioner: Captioner | None, crops: np.ndarray, stats: dict, warnings: list) -> list[str]:
    if captioner is None:
        return []
    try:
        produced = captioner(crops, stats)
    except Exception as err:  # noqa: BLE001 -- a model failing on one clip must not lose the input
        warnings.append(f"captioner failed on a clip ({err.__class__.__name__}: {err}); kept the draft")
        return []
    if isinstance(produced, str):
        produced = [produced]
    return [c.strip() for c in produced or [] if isinstance(c, str) and c.strip()]


def curate_video(path: str | os.PathLike, out_dir: str | os.PathLike, config: CurationConfig,
                 detector: FaceDetector, captioner: Captioner | None = None) -> dict:
    """Process one input file; returns its result (what the report and the manifest are built from).

    Never raises for a bad video: unreadable files come back with status "error" and the reason.
    """
    path, out_dir = Path(path), Path(out_dir)
    started = time.perf_counter()
    prefix = clip_prefix(path)
    clips_dir = out_dir / "clips"
    for stale in clips_dir.glob(f"{prefix}_*.mp4"):  # left by an interrupted earlier attempt
        stale.unlink()
    records: list[dict] = []
    warnings: list[str] = []

    def keep(crops: np.ndarray, stats: dict) -> None:
        clip_id = f"{prefix}_{len(records):03d}"
        video = write_video(clips_dir / f"{clip_id}.mp4", crops, config.fps)
        draft, attributes = draft_caption(stats)
        captions = _captions(captioner, crops, stats, warnings) + [draft]
        record = ClipRecord(
            clip_id=clip_id, video=str(video), captions=list(dict.fromkeys(captions)), attributes=attributes,
            fps=config.fps,
            extra={"source_video": str(path), "source_time_range": [stats["start"],
                                                                    round(stats["start"] + stats["seconds"], 3)],
                   "draft_caption": draft,
                   "stats": {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}})
        records.append(record.to_json(relative_to=out_dir))

    curator = VideoCurator(config, detector, keep)
    result = {"input": str(path), "clips": records, "warnings": warnings}
    try:
        for frame in resample(iter_frames(path), config.fps):
            curator.feed(frame)
    except VideoDecodeError as err:
        if curator.seconds == 0:
            return result | {"status": "error", "reason": err.reason, "seconds": 0.0,
                             "wall_seconds": time.perf_counter() - started}
        warnings.append(f"decoding stopped after {curator.seconds:.1f} s: {err.reason}")
    curator.finish()
    status = "kept" if records else "dropped"
    reason = None if records else _summarise_drops(curator.dropped_seconds, curator.dropped_clips)
    return result | {
        "status": status, "reason": reason, "seconds": round(curator.seconds, 3),
        "kept_seconds": round(sum(r["stats"]["seconds"] for r in records), 3),
        "dropped_seconds": {k: round(v, 3) for k, v in curator.dropped_seconds.items()},
        "dropped_clips": dict(curator.dropped_clips),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
