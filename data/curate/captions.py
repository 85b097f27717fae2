"""Caption drafting from what the pipeline measured, and the hook for a captioning model.

The draft only states what the numbers support (lighting, background colour, framing, whether the
mouth moves); identity attributes (age, gender, hair, emotion) need a model. A captioner is any
callable ``captioner(frames, stats) -> str | list[str] | None`` given the clip's uint8 frames
``(T, S, S, 3)`` and the measured stats plus the draft; plug one with
``--captioner package.module:factory`` (``factory()`` returns the callable). Its captions come first in
the manifest; the draft is always kept as ``draft_caption``.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from data.curate.faces import load_factory

Captioner = Callable[[np.ndarray, dict], "str | list[str] | None"]

# OpenCV hue runs 0-180; upper bounds of each named hue band.
HUE_NAMES = ((8, "red"), (20, "orange"), (33, "yellow"), (78, "green"), (96, "teal"), (130, "blue"),
             (150, "purple"), (170, "pink"), (180, "red"))


def colour_name(rgb: np.ndarray) -> str:
    """Plain-English name of one RGB colour."""
    hue, saturation, value = cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV)[0, 0].tolist()
    if value < 50:
        return "black"
    if saturation < 45:
        return "white" if value > 200 else "gray"
    name = next(label for bound, label in HUE_NAMES if hue < bound)
    if name in ("orange", "red", "yellow") and value < 140:
        return "brown"
    return name


def background_colour(crop: np.ndarray) -> str:
    """Median colour of the crop's upper corners: beside the head, usually background."""
    size = crop.shape[0]
    band, corner = max(1, size // 4), max(1, size // 5)
    corners = np.concatenate([crop[:band, :corner].reshape(-1, 3), crop[:band, -corner:].reshape(-1, 3)])
    return colour_name(np.median(corners, axis=0).astype(np.uint8))


def draft_caption(stats: dict) -> tuple[str, dict]:
    """FaceVid-1K-style caption and attributes from the clip's measured stats."""
    luma = stats["brightness"]
    lighting = "dim" if luma < 80 else "bright" if luma > 170 else "soft"
    warmth = stats["warmth"]
    tone = "warm" if warmth > 12 else "cool" if warmth < -12 else "neutral"
    if stats["mouth_motion"] > 2.0:
        action = "talking"
    elif stats["face_motion"] > 0.15:
        action = "moving their head"
    else:
        action = "still"
    framing = "close-up" if stats["face_share"] > 0.55 else "head and shoulders"
    offset = stats["face_offset"]
    position = "on the left" if offset < -0.12 else "on the right" if offset > 0.12 else "in the center"
    caption = (f"a person {'keeping ' if action == 'still' else ''}{action}, {framing}, face {position}. "
               f"The background is mostly {stats['background']}, with {lighting}, {tone} lighting.")
    attributes = {"action": action, "framing": framing, "background_color": stats["background"],
                  "lighting": lighting, "light_tone": tone}
    return caption, attributes


def load_captioner(spec: str | None) -> Captioner | None:
    return load_factory(spec, "captioner")() if spec else None
