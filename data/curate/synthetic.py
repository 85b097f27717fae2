"""Raw-looking test videos from the real photographs that ship with scikit-image.

No package ships face video, so shots are made by moving a camera window over a photo: the
astronaut portrait (a real face), LFW face crops, and non-face scenes (coffee, cat, rocket). Used by
the tests and by bench/curation_throughput.py. The writer streams frames to PyAV (a few minutes of
640x360 would not fit in memory as one array) and can set per-frame timestamps (variable frame
rate) and a display rotation, which data.video.write_video does not do.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np

# Where the astronaut's face is in skimage's 512x512 photo (x, y, width): found by the Haar cascade.
ASTRONAUT_FACE = (177, 67, 93)


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def lfw_face(index: int) -> np.ndarray:
    """One of skimage's LFW faces (25x25 grey crops) enlarged to 160 px on a 320x240 grey backdrop:
    a real face, but as soft as an upscaled one."""
    from skimage import data

    grey = (data.lfw_subset()[index] * 255).astype(np.uint8)
    canvas = np.full((240, 320), 120, np.uint8)
    canvas[40:200, 80:240] = cv2.resize(grey, (160, 160), interpolation=cv2.INTER_CUBIC)
    return np.repeat(canvas[..., None], 3, axis=2)


def scene(name: str) -> np.ndarray:
    """A non-face skimage photo as RGB: 'coffee', 'chelsea', 'rocket', 'camera' ..."""
    from skimage import data

    image = getattr(data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


@dataclass
class Shot:
    """A camera window gliding over `image` from `start` to `end` ((x, y, width) in image pixels)."""

    image: np.ndarray
    seconds: float
    start: tuple[float, float, float]
    end: tuple[float, float, float] | None = None
    talking: bool = False  # open and close the astronaut's mouth (about 3 times a second)

    def frames(self, size: tuple[int, int], fps: float) -> Iterator[np.ndarray]:
        width, height = size
        count = max(1, round(self.seconds * fps))
        end = self.end or self.start
        for i in range(count):
            t = i / max(count - 1, 1)
            image = _open_mouth(self.image, abs(np.sin(np.pi * 3 * i / fps))) if self.talking else self.image
            x, y, w = (a + (b - a) * t for a, b in zip(self.start, end))
            # Sub-pixel window via an affine warp: integer crops would make the pan jerk.
            scale = width / w
            matrix = np.float32([[scale, 0, -x * scale], [0, scale, -y * scale]])
            yield cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT)


def _open_mouth(image: np.ndarray, openness: float) -> np.ndarray:
    """The astronaut with her mouth open by `openness` (0-1): a dark ellipse between the lips."""
    if openness < 0.1:
        return image
    image = image.copy()
    cv2.ellipse(image, (222, 146), (11, max(1, round(6 * openness))), 0, 0, 360, (60, 25, 30), -1)
    return image


def face_shot(seconds: float, pan: float = 40.0, zoom: float = 1.0, talking: bool = False) -> Shot:
    """The astronaut's head and shoulders, the camera panning `pan` pixels (of the 512 photo)."""
    width = 330 / zoom
    x = 225 - width / 2  # keeps the face (centre x about 223) in the middle of the window
    return Shot(astronaut(), seconds, (x, 10, width), (x + pan, 10 + pan / 4, width), talking)


def scene_shot(name: str, seconds: float) -> Shot:
    image = scene(name)
    w = image.shape[1] * 0.7
    return Shot(image, seconds, (0, 0, w), (image.shape[1] * 0.2, image.shape[0] * 0.05, w))


def shot_frames(shots: Sequence[Shot], size: tuple[int, int], fps: float) -> Iterator[np.ndarray]:
    for shot in shots:
        yield from shot.frames(size, fps)


def write_stream(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float, rotation: int = 0,
                 times: Sequence[float] | None = None) -> None:
    """Stream uint8 RGB frames into an H.264 mp4.

    `times` (seconds per frame) makes a variable-frame-rate file; `rotation` stores a display
    rotation (counter-clockwise degrees) the way phones do, leaving the pixels as given.
    """
    time_base = Fraction(1, 1000)
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        # 4:2:0 chroma needs even sizes; 4:4:4 keeps odd ones (101x77) exactly as given.
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        if times is not None:
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        for index, rgb in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[index] / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_audio_only(path: str | os.PathLike, seconds: float = 1.0) -> None:
    """An .mp4 holding only an AAC tone: a real media file with no video stream."""
    rate = 16000
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            chunk = samples[start:start + 1024][None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
