"""What is measured on the stream: shot boundaries, sharpness, exposure, black bars and motion.

All measures are cheap (a few tenths of a millisecond on small images) because they run on every
frame (shot boundaries) or on every keyframe (the rest).
"""

from __future__ import annotations

import cv2
import numpy as np

from data.curate.faces import Box, CropWindow

THUMB_WIDTH = 96  # frames are compared as thumbnails this wide
SHARPNESS_SIZE = 96  # the face is resized to this before measuring its sharpness


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    thumb_height = max(1, round(height * THUMB_WIDTH / width))
    # Bilinear to twice the size, then an exact 2x area average: nearly as alias-free as one area
    # resize (which OpenCV runs slowly at non-integer ratios), at a tenth of the cost.
    double = cv2.resize(rgb, (2 * THUMB_WIDTH, 2 * thumb_height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(double, (THUMB_WIDTH, thumb_height), interpolation=cv2.INTER_AREA)


class ShotBoundaryDetector:
    """Cuts from colour-histogram change, plus a frame-difference check for same-palette cuts.

    The hue/saturation/value histogram barely moves when the camera pans or a person talks but jumps
    at a cut to another scene; a cut between two shots of the same scene keeps the palette, which the
    grey-level difference catches. Gradual transitions (fades) are not split here; the face track and
    the filters deal with their frames.
    """

    def __init__(self, hist_threshold: float = 0.35, diff_threshold: float = 40.0):
        self.hist_threshold = hist_threshold
        self.diff_threshold = diff_threshold
        self.previous: tuple[np.ndarray, np.ndarray] | None = None

    def is_cut(self, thumb: np.ndarray) -> bool:
        hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [12, 4, 4], [0, 180, 0, 256, 0, 256])
        cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)
        grey = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY).astype(np.int16)
        previous, self.previous = self.previous, (hist, grey)
        if previous is None or previous[1].shape != grey.shape:
            return False
        distance = cv2.compareHist(previous[0], hist, cv2.HISTCMP_BHATTACHARYYA)
        difference = float(np.abs(grey - previous[1]).mean())
        return distance > self.hist_threshold or difference > self.diff_threshold


def sharpness(rgb: np.ndarray, face: Box) -> float:
    """Variance of the Laplacian over the face, at a fixed size and contrast so that thresholds do not
    depend on resolution or exposure (an upscaled small face scores as blurry, which it is)."""
    x, y, w, h = (round(v) for v in face)
    pixels = rgb[max(y, 0):y + h, max(x, 0):x + w]
    if pixels.size == 0:
        pixels = rgb
    grey = cv2.cvtColor(cv2.resize(pixels, (SHARPNESS_SIZE, SHARPNESS_SIZE), interpolation=cv2.INTER_AREA),
                        cv2.COLOR_RGB2GRAY)
    # Stretched to full contrast first: a dim but sharp face must not read as blurry.
    grey = cv2.normalize(grey, None, 0, 255, cv2.NORM_MINMAX)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def brightness(rgb_crop: np.ndarray) -> float:
    """Mean luma, 0-255."""
    return float(cv2.cvtColor(rgb_crop, cv2.COLOR_RGB2GRAY).mean())


def border_fraction(rgb_crop: np.ndarray, level: float = 20.0) -> float:
    """Share of the crop's height or width taken by near-black bars along its edges (letterboxing)."""
    grey = cv2.cvtColor(rgb_crop, cv2.COLOR_RGB2GRAY)
    rows, cols = grey.mean(axis=1), grey.mean(axis=0)

    def run_length(values: np.ndarray) -> int:
        dark = values < level
        return len(dark) if dark.all() else int(np.argmin(dark))

    vertical = (run_length(rows) + run_length(rows[::-1])) / len(rows)
    horizontal = (run_length(cols) + run_length(cols[::-1])) / len(cols)
    return float(min(1.0, max(vertical, horizontal)))


def camera_shift(previous_thumb: np.ndarray, thumb: np.ndarray) -> float:
    """Global translation between two thumbnails, in frame widths (phase correlation)."""
    a = cv2.cvtColor(previous_thumb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    b = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if a.shape != b.shape:
        return 0.0
    (dx, dy), _ = cv2.phaseCorrelate(a, b)
    return float(np.hypot(dx, dy) / a.shape[1])


FACE_PATCH = 64  # faces are compared across keyframes as grey patches this size


def face_patch(rgb: np.ndarray, face: Box) -> np.ndarray:
    """The `face` box of an image as a grey FACE_PATCH x FACE_PATCH patch (int16, ready to subtract)."""
    height, width = rgb.shape[:2]
    x, y, w, h = face
    left, top = max(round(x), 0), max(round(y), 0)
    right, bottom = min(round(x + w), width), min(round(y + h), height)
    if right <= left or bottom <= top:
        return np.zeros((FACE_PATCH, FACE_PATCH), np.int16)
    patch = cv2.resize(rgb[top:bottom, left:right], (FACE_PATCH, FACE_PATCH), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.int16)


def mouth_motion(previous_patch: np.ndarray, patch: np.ndarray) -> float:
    """How much more the mouth changed than the eyes between two keyframes (grey levels, >= 0).

    Talking moves the lower face, not the eyes; detector jitter and head motion shift both alike, so
    subtracting the eye band keeps only mouth movement.
    """
    change = np.abs(patch - previous_patch)
    mouth = change[int(0.68 * FACE_PATCH):int(0.95 * FACE_PATCH), int(0.25 * FACE_PATCH):int(0.75 * FACE_PATCH)]
    eyes = change[int(0.2 * FACE_PATCH):int(0.47 * FACE_PATCH), int(0.15 * FACE_PATCH):int(0.85 * FACE_PATCH)]
    return max(0.0, float(mouth.mean() - eyes.mean()))


def face_in_crop(face: Box, window: CropWindow, frame_size: tuple[int, int], out_size: int) -> Box:
    """The face box in the coordinates of the written crop."""
    left, top, side = window.pixels(*frame_size)
    scale = out_size / side
    x, y, w, h = face
    return ((x - left) * scale, (y - top) * scale, w * scale, h * scale)
