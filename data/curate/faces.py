"""Face detection behind a small interface, face tracking, and the face-and-shoulders crop.

A detector is any callable ``detector(rgb) -> list of (x, y, w, h)`` boxes in pixels of the frame it is
given. The default is OpenCV's Haar frontal-face cascade (ships with opencv-python-headless, works
offline); plug a better model with ``--detector package.module:factory`` where ``factory()`` returns
such a callable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x, y, width, height in pixels


class FaceDetector(Protocol):
    def __call__(self, rgb: np.ndarray) -> Sequence[Box]: ...


class HaarFaceDetector:
    """OpenCV's Haar frontal-face cascade, run on a downscaled grey frame.

    Cost grows with the pixels searched and the number of window sizes tried, so the frame is shrunk
    to `detect_size` pixels (longer side) and windows start at `min_size` source pixels (never below
    the cascade's 24 px). `min_neighbors` trades misses for false positives; the pipeline also
    ignores a second face seen on one keyframe only, the cascade's typical false positive.
    """

    def __init__(self, min_size: float = 0.0, detect_size: int = 320, scale_factor: float = 1.2,
                 min_neighbors: int = 6):
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"could not load the Haar cascade {path} (opencv-python-headless>=5 ships "
                               "without it: install opencv-python-headless<5)")
        self.min_size = min_size
        self.detect_size = detect_size
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors

    def __call__(self, rgb: np.ndarray) -> list[Box]:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.detect_size / max(height, width))
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)  # evens out dim or washed-out footage
        window = max(24, round(self.min_size * scale))
        found = self.cascade.detectMultiScale(grey, scaleFactor=self.scale_factor,
                                              minNeighbors=self.min_neighbors, minSize=(window, window))
        return [tuple(float(v) / scale for v in box) for box in found]


def load_detector(spec: str = "haar", min_size: float = 0.0) -> FaceDetector:
    """'haar' (searching faces from `min_size` pixels up) or 'package.module:factory' (factory()
    returns a detector callable)."""
    if spec == "haar":
        return HaarFaceDetector(min_size=min_size)
    return load_factory(spec, "detector")()


def load_factory(spec: str, what: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} must be given as 'package.module:name', got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def iou(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    overlap_w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    overlap_h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    overlap = overlap_w * overlap_h
    union = aw * ah + bw * bh - overlap
    return overlap / union if union > 0 else 0.0


@dataclass
class CropWindow:
    """A square crop: centre and side in source pixels (floats, so it can be smoothed and blended)."""

    cx: float
    cy: float
    side: float

    @classmethod
    def around_face(cls, face: Box, scale: float, drop: float) -> CropWindow:
        """Face plus shoulders: `scale` times the face width, centre moved down by `drop` face heights."""
        x, y, w, h = face
        return cls(x + w / 2, y + h / 2 + drop * h, w * scale)

    def blend(self, other: CropWindow, weight: float) -> CropWindow:
        """(1 - weight) * self + weight * other: used for the EMA and for in-between frames."""
        keep = 1.0 - weight
        return CropWindow(keep * self.cx + weight * other.cx, keep * self.cy + weight * other.cy,
                          keep * self.side + weight * other.side)

    def pixels(self, frame_width: int, frame_height: int) -> tuple[int, int, int]:
        """(left, top, side) clamped inside the frame: shifted rather than padded, never black bars."""
        side = round(min(self.side, frame_width, frame_height))
        left = round(min(max(self.cx - side / 2, 0), frame_width - side))
        top = round(min(max(self.cy - side / 2, 0), frame_height - side))
        return left, top, side


def crop_square(rgb: np.ndarray, window: CropWindow, size: int) -> np.ndarray:
    left, top, side = window.pixels(rgb.shape[1], rgb.shape[0])
    patch = rgb[top:top + side, left:left + side]
    # Area averaging where it matters (shrinking 2x or more); bilinear, 5x cheaper, for the usual
    # small reductions; bicubic when enlarging.
    if side >= 2 * size:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_LINEAR if side >= size else cv2.INTER_CUBIC
    return cv2.resize(patch, (size, size), interpolation=interpolation)


@dataclass
class FaceTrack:
    """One face followed through a shot: the last detection and the EMA-smoothed crop window."""

    face: Box
    window: CropWindow
    missed: int = 0  # keyframes in a row without a matching detection

    def update(self, face: Box, window: CropWindow, smoothing: float) -> None:
        self.face = face
        self.window = self.window.blend(window, smoothing)
        self.missed = 0
