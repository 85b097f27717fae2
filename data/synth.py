"""FaceVid-Synth: procedural talking-face clips with FaceVid-1K-style captions and attributes.

The embedded default dataset: seedable, CPU-cheap, and written exactly like a real dataset (mp4 files
plus a JSONL manifest, see data/manifest.py), so every training path runs on it unchanged.

Each clip is a head-and-shoulders shot drawn with numpy from signed distances (one-pixel analytic
antialiasing, no supersampling needed). Every attribute value is kept far apart in colour or geometry
and every action is a distinct motion within any 8-frame window, so that a simple pixel probe can
recover all attributes even from a blurry 64x64 reconstruction; per-clip jitter (position, size, tints,
motion phase and speed) makes clips differ. With aligned_motion, every periodic action keeps one rhythm
and starts from the same pose (a talking mouth opens from closed at frame 0, every clip at the same
speed), so that an action's average clip is itself that action: the timing then follows from the words
alone, which a small model learns far sooner than timing chosen by the noise (docs/experiments.md).

Conventions: image coordinates in pixels, y pointing down; "turning left" means the face turns
towards the left of the frame (the viewer's left).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.manifest import ClipRecord, write_manifest
from data.video import write_video

ATTRIBUTES: dict[str, list[str]] = {
    "skin_tone": ["light", "medium", "tan", "dark"],
    "hair_color": ["black", "brown", "blonde", "red", "gray"],
    "hair_length": ["short", "long"],
    "glasses": ["glasses", "no glasses"],
    "beard": ["beard", "no beard"],
    "emotion": ["neutral", "happy", "sad", "surprised"],
    "background": ["white wall", "green park", "blue studio", "orange room"],
    "lighting": ["bright", "dim"],
    "action": ["talking", "blinking", "nodding", "turning left", "turning right", "still"],
}

# Bumped whenever rendering changes, so that generate() does not reuse clips drawn by older code.
SYNTH_VERSION = 2

# Skin and hair colours are at least ~50 RGB levels from each other (and hair from backgrounds).
SKIN_RGB = {"light": (240, 200, 175), "medium": (205, 150, 110), "tan": (165, 110, 70), "dark": (120, 80, 62)}
HAIR_RGB = {"black": (22, 20, 24), "brown": (85, 42, 14), "blonde": (235, 195, 60), "red": (185, 55, 20),
            "gray": (150, 150, 158)}
LIGHTING_GAIN = {"bright": 1.0, "dim": 0.55}

# Mouth: `bend` lifts the corners (ry units; negative = frown), `half_width` in rx units, `opening` of
# the lips in ry units. Brows: how far the inner / outer ends are raised (ry units).
EMOTION_SHAPES = {
    "neutral": {"bend": 0.0, "half_width": 0.38, "opening": 0.0, "brow_inner": 0.0, "brow_outer": 0.0},
    "happy": {"bend": 0.2, "half_width": 0.52, "opening": 0.12, "brow_inner": 0.06, "brow_outer": 0.06},
    "sad": {"bend": -0.22, "half_width": 0.4, "opening": 0.0, "brow_inner": 0.18, "brow_outer": -0.06},
    "surprised": {"bend": 0.0, "half_width": 0.22, "opening": 0.34, "brow_inner": 0.2, "brow_outer": 0.2},
}
# Mouth row and lip thickness (ry units below the face centre), how far a talking mouth opens (the
# part of the way to fully open that an emotion's mouth leaves), and how far the chin follows it.
# evaluation/probe.py redraws the mouth from these.
MOUTH_Y, LIP_THICKNESS, TALK_OPENING, JAW_DROP = 0.45, 0.09, 0.32, 0.04


def mouth_opening(shape: dict, talk):
    """Lip opening (ry units) of an emotion's mouth at talk amount 0..1: an open mouth opens less."""
    return shape["opening"] + TALK_OPENING * (1.0 - shape["opening"]) * talk

SHIRT_RGB = [(60, 60, 66), (40, 48, 90), (120, 30, 40), (200, 190, 170), (70, 95, 70), (150, 150, 150)]
MOUTH_RGB = (95, 28, 34)
EYE_WHITE_RGB = (245, 245, 240)
IRIS_RGB = (40, 30, 30)
FRAME_RGB = (18, 18, 20)
LENS_RGB = (210, 228, 245)


# ----------------------------------------------------------------------------- attributes & captions


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One value per attribute, uniformly."""
    return {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}


def _check_attributes(attributes: dict[str, str]) -> None:
    for name, values in ATTRIBUTES.items():
        if attributes.get(name) not in values:
            raise ValueError(f"attribute {name!r} must be one of {values}, got {attributes.get(name)!r}")


# How captions say each value (one phrase drawn per caption). skin_tone, hair_color, hair_length and
# lighting are said with the value itself ("dark skin", "long red hair", "dim lighting").
PHRASES: dict[str, dict[str, list[str]]] = {
    "glasses": {"glasses": ["glasses", "wearing glasses"], "no glasses": ["no glasses", "without glasses"]},
    "beard": {"beard": ["a beard", "bearded"], "no beard": ["clean-shaven", "no beard"]},
    "emotion": {
        "neutral": ["with a neutral expression", "with a calm, neutral face"],
        "happy": ["smiling", "looking happy"],
        "sad": ["looking sad", "with a sad expression"],
        "surprised": ["looking surprised", "with a surprised expression"],
    },
    "action": {
        "talking": ["talking", "speaking"],
        "blinking": ["blinking", "blinking their eyes"],
        "nodding": ["nodding", "nodding their head"],
        "turning left": ["turning their head to the left", "turning left"],
        "turning right": ["turning their head to the right", "turning right"],
        "still": ["holding still", "keeping still"],
    },
    "background": {
        "white wall": ["indoors against a white wall", "in front of a white wall"],
        "green park": ["outdoors in a green park", "in a green park"],
        "blue studio": ["in front of a blue studio backdrop", "against a blue studio backdrop"],
        "orange room": ["in a warm orange room", "inside a warm orange room"],
    },
}

# FaceVid-1K style: every template states every attribute, so the caption determines the video.
_CAPTION_TEMPLATES = [
    ("a person with {skin} skin and {hair} hair, {glasses}, {beard}, {emotion}, {action}, {background}, "
     "{lighting} lighting"),
    ("a {skin}-skinned person with {hair} hair {action}, {emotion}, {glasses}, {beard}, {background}, "
     "{lighting} light"),
    ("close-up of a person {action} {background}, {hair} hair, {skin} skin, {glasses}, {beard}, {emotion}, "
     "{lighting} lighting"),
    ("{lighting} lighting, {background}: a person with {hair} hair and {skin} skin, {beard}, {glasses}, "
     "{emotion}, {action}"),
    ("video of a {skin}-skinned person, {hair} hair, {glasses}, {beard}, {emotion}, {action}, "
     "{background}, {lighting} light"),
]


def caption_for(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A caption stating every attribute, in one of several phrasings (template and synonyms from rng).

    Example: "a person with light skin and long blonde hair, glasses, clean-shaven, smiling, talking,
    indoors against a white wall, bright lighting".
    """
    _check_attributes(attributes)

    def pick(options: list[str]) -> str:
        return options[rng.integers(len(options))]

    template = _CAPTION_TEMPLATES[rng.integers(len(_CAPTION_TEMPLATES))]
    return template.format(
        skin=attributes["skin_tone"],
        hair=f"{attributes['hair_length']} {attributes['hair_color']}",
        lighting=attributes["lighting"],
        **{name: pick(phrases[attributes[name]]) for name, phrases in PHRASES.items()},
    )


# ----------------------------------------------------------------------------- drawing primitives
# Shapes return coverage in [0, 1] from a signed distance in pixels (negative inside): a one-pixel
# ramp across the edge is the antialiasing. Parameters may be scalars or per-frame (T, 1, 1) arrays;
# broadcasting against the (1, H, W) grid gives (1 or T, H, W) coverage.


def _coverage(distance):
    return np.clip(0.5 - distance, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry):
    dx, dy = x - cx, y - cy
    implicit = (dx / rx) ** 2 + (dy / ry) ** 2 - 1.0
    gradient = 2.0 * np.sqrt((dx / rx**2) ** 2 + (dy / ry**2) ** 2)
    return _coverage(implicit / np.maximum(gradient, 1e-6))  # first-order distance to the outline


def _ring(x, y, cx, cy, rx, ry, thickness):
    """Outline of an ellipse, `thickness` pixels wide."""
    return _ellipse(x, y, cx, cy, rx + thickness / 2, ry + thickness / 2) * (
        1.0 - _ellipse(x, y, cx, cy, np.maximum(rx - thickness / 2, 0.1), np.maximum(ry - thickness / 2, 0.1))
    )


def _segment(x, y, x0, y0, x1, y1, thickness):
    """A stroke from (x0, y0) to (x1, y1) with round caps."""
    vx, vy = x1 - x0, y1 - y0
    along = np.clip(((x - x0) * vx + (y - y0) * vy) / np.maximum(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
    return _coverage(np.hypot(x - x0 - along * vx, y - y0 - along * vy) - thickness / 2)


def _rounded_box(x, y, cx, cy, half_w, half_h, radius):
    qx = np.abs(x - cx) - half_w + radius
    qy = np.abs(y - cy) - half_h + radius
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return _coverage(outside + np.minimum(np.maximum(qx, qy), 0.0) - radius)


def _mouth(x, y, cx, cy, half_width, bend, thickness, opening):
    """Lips as a lens between two parabolas: `bend` lifts the corners, `opening` parts the middle."""
    q = np.clip((x - cx) / half_width, -1.0, 1.0) ** 2
    centre = cy - bend * q
    top = centre - thickness / 2
    bottom = centre + thickness / 2 + opening * (1.0 - q)
    vertical = np.maximum(top - y, y - bottom)
    return _coverage(np.maximum(vertical, np.abs(x - cx) - half_width))


def _paint(canvas, coverage, rgb, opacity=1.0):
    """Alpha-composite a flat colour; the canvas grows from (1, H, W, 3) to (T, H, W, 3) when needed."""
    alpha = (coverage * opacity)[..., None]
    return canvas + (np.asarray(rgb, np.float32) - canvas) * alpha


def _tint(rgb, rng, amount=0.04):
    """Small per-clip colour variation that keeps every palette entry far from the others."""
    return np.asarray(rgb, np.float32) * rng.uniform(1 - amount, 1 + amount, size=3).astype(np.float32)


# ----------------------------------------------------------------------------- scene


def _background(name: str, x, y, size: int, rng) -> np.ndarray:
    """(1, H, W, 3): each environment a clearly distinct colour, with a little texture."""
    u, v = x / size, y / size  # 0..1
    if name == "white wall":
        base = _tint((232, 232, 226), rng, 0.02)
        panels = 6.0 * np.cos(2 * np.pi * (u * 3 + rng.uniform()))  # soft wall panels
        image = base + (panels - 10.0 * v)[..., None]
    elif name == "green park":
        image = np.broadcast_to(_tint((92, 165, 78), rng), (*u.shape, 3)).copy()
        for _ in range(4):  # darker tree crowns in the upper part
            crown = _ellipse(x, y, rng.uniform(0, size), rng.uniform(0, 0.45) * size,
                             rng.uniform(0.12, 0.22) * size, rng.uniform(0.1, 0.18) * size)
            image = _paint(image, crown, (50, 118, 48), 0.8)
        grass = _coverage((rng.uniform(0.68, 0.75) - v) * size)
        image = _paint(image, grass, _tint((66, 140, 46), rng))
    elif name == "blue studio":
        centre = np.hypot(u - 0.5, v - 0.4)
        image = _tint((70, 105, 200), rng) * (1.0 - 0.75 * centre)[..., None]
    elif name == "orange room":
        image = np.broadcast_to(_tint((228, 138, 58), rng), (*u.shape, 3)).copy()
        lamp_x = rng.choice([0.12, 0.88])
        glow = np.exp(-((u - lamp_x) ** 2 + (v - 0.2) ** 2) / 0.03)
        image = image + (25.0 * glow)[..., None]
        floor = _coverage((rng.uniform(0.72, 0.78) - v) * size)
        image = _paint(image, floor, _tint((170, 92, 40), rng))
    else:
        raise ValueError(f"unknown background {name!r}")
    return image.astype(np.float32)


def _motion(action: str, num_frames: int, rng, aligned: bool = False) -> dict:
    """Per-frame pose, each (T, 1, 1): yaw (-1 left .. 1 right), nod (-1 up .. 1 down), eye and mouth
    opening (0..1). Periods are 5.5-8 frames: any 8-frame window holds a full cycle, and they stay clear
    of 4 frames, which every-other-frame sampling would alias to no motion at all. `aligned`: each periodic
    action at one period inside its range and from the rest pose (mouth closed, eyes open, head level)."""
    t = np.arange(num_frames, dtype=np.float32)[:, None, None]
    zeros = np.zeros_like(t)
    pose = {"yaw": zeros, "nod": zeros, "eyes": np.ones_like(t), "mouth": zeros}
    # Both drawn whether used or not, so that aligned and random clips of a seed share every other draw.
    phase, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0, 1)
    if aligned:
        phase = 0.0

    def period(low: float, high: float, aligned_period: float) -> float:
        return aligned_period if aligned else low + (high - low) * speed

    if action == "talking":
        cycle = 2 * np.pi * t / period(5.5, 7.5, 6.0) + phase
        pose["mouth"] = rng.uniform(0.8, 1.0) * (0.5 - 0.5 * np.cos(cycle))
    elif action == "blinking":
        # Closed for two frames per period: even every-other-frame sampling sees each blink.
        frames = int(period(6, 9, 7))  # 6, 7 or 8
        profile = np.array([0.45, 0.0, 0.0, 0.45] + [1.0] * (frames - 4), np.float32)
        pose["eyes"] = profile[(t.astype(int) + int(frames * phase / (2 * np.pi))) % frames]
    elif action == "nodding":
        pose["nod"] = np.sin(2 * np.pi * t / period(6.0, 8.0, 7.0) + phase)
    elif action in ("turning left", "turning right"):
        direction = -1.0 if action == "turning left" else 1.0
        start, end = rng.uniform(-0.1, 0.1), rng.uniform(0.75, 0.95)
        progress = t / max(num_frames - 1, 1)
        pose["yaw"] = direction * (start + (end - start) * progress)
    elif action != "still":
        raise ValueError(f"unknown action {action!r}")
    # Constant curves become (1, 1, 1): whatever they drive is drawn once and broadcast over time.
    return {name: curve if np.ptp(curve) > 0 else curve[:1] for name, curve in pose.items()}


def draw_face(canvas, x, y, *, cx, cy, features_x, features_y, rx0, ry, skin, hair, emotion: str, glasses: bool,
              beard: bool, yaw=0.0, eyes=1.0, mouth=0.0, upper: bool = True, lower: bool = True):
    """Paint a face onto `canvas`, from its skin outline to the glasses: beard, fringe, eyes, brows, nose, lips.

    The face outline is centred at (cx, cy) with radii (rx0 narrowed by the turn, ry); eyes, nose and mouth
    are placed from (features_x, features_y). Pose: yaw (-1 left .. 1 right), eyes (1 open .. 0 shut), mouth
    (0 closed .. 1 talking, open); each a scalar or per-frame (T, 1, 1). `upper` / `lower`: whether to draw
    the parts above (fringe, eyes, brows, glasses) and below (beard, lips) the nose, for callers that only
    need a window of the face. render_clip draws every clip's face with it; evaluation/probe.py redraws
    faces with it for its analysis-by-synthesis fits.
    """
    turned = np.abs(yaw)
    rx = rx0 * (1.0 - 0.15 * turned)  # the face narrows as it turns away
    hair_x = cx - 0.25 * rx0 * yaw  # the back of the head shows on the side turned away
    shape = EMOTION_SHAPES[emotion]
    jaw_drop = JAW_DROP * ry * mouth  # the chin follows the mouth when talking
    canvas = _paint(canvas, _ellipse(x, y, cx, cy + jaw_drop, rx, ry + jaw_drop), skin)

    mouth_y = features_y + (MOUTH_Y + 0.4 * shape["bend"]) * ry
    mouth_x = features_x + 0.1 * rx0 * yaw
    if beard and lower:
        below_nose = _coverage(mouth_y - 0.14 * ry - y)
        lower_face = _ellipse(x, y, cx, cy + 0.04 * ry, 1.04 * rx, 1.04 * ry) * below_nose
        # Bare skin around the lips keeps the mouth (and so the emotion) visible on a dark beard.
        lips_area = _ellipse(x, y, mouth_x, mouth_y + shape["opening"] * 0.4 * ry,
                             (shape["half_width"] + 0.12) * rx0, (0.13 + shape["opening"] * 0.7) * ry)
        canvas = _paint(canvas, lower_face * (1.0 - lips_area), hair * 0.85)

    if upper:  # fringe: the hair ellipse above a hairline that comes down at the temples
        hairline = cy - 0.52 * ry + 0.3 * ry * ((x - cx) / rx0) ** 2
        fringe = _ellipse(x, y, hair_x, cy - 0.1 * ry, 1.12 * rx0, 1.06 * ry) * _coverage(y - hairline)
        canvas = _paint(canvas, fringe, hair)

    eye_y = features_y - 0.1 * ry
    brow_y = eye_y - 0.26 * ry
    eye_centres = []
    for side in (-1.0, 1.0):  # image left, image right
        if not upper:
            break
        squeeze = 1.0 - 0.45 * np.maximum(side * yaw, 0.0)  # the eye on the far side foreshortens
        ex = features_x + side * 0.42 * rx * (1.0 - 0.2 * turned)
        eye_centres.append((ex, squeeze))
        eye_h = np.maximum(0.12 * ry * eyes, 0.025 * ry)
        canvas = _paint(canvas, _ellipse(x, y, ex, eye_y, 0.2 * rx0 * squeeze, eye_h), EYE_WHITE_RGB)
        canvas = _paint(canvas, _ellipse(x, y, ex, eye_y, 0.1 * rx0 * squeeze, eye_h), IRIS_RGB)
        inner_x, outer_x = ex - side * 0.16 * rx0 * squeeze, ex + side * 0.2 * rx0 * squeeze
        brow = _segment(x, y, inner_x, brow_y - shape["brow_inner"] * ry, outer_x,
                        brow_y - shape["brow_outer"] * ry, 0.09 * ry)
        canvas = _paint(canvas, brow, hair * 0.75)

    nose = _ellipse(x, y, features_x + 0.12 * rx0 * yaw, features_y + 0.15 * ry, 0.08 * rx0, 0.15 * ry)
    canvas = _paint(canvas, nose, skin * 0.8)
    if lower:
        lips = _mouth(x, y, mouth_x, mouth_y, shape["half_width"] * rx * (1 - 0.2 * turned),
                      shape["bend"] * ry, LIP_THICKNESS * ry, mouth_opening(shape, mouth) * ry)
        canvas = _paint(canvas, lips, MOUTH_RGB)

    if glasses and upper:
        rim_w = max(0.09 * rx0, 1.0)
        for ex, squeeze in eye_centres:
            lens = _ellipse(x, y, ex, eye_y, 0.32 * rx0 * squeeze, 0.22 * ry)
            canvas = _paint(canvas, lens, LENS_RGB, 0.35)
            canvas = _paint(canvas, _ring(x, y, ex, eye_y, 0.32 * rx0 * squeeze, 0.22 * ry, rim_w), FRAME_RGB)
        (left_x, left_s), (right_x, right_s) = eye_centres
        bridge = _segment(x, y, left_x + 0.32 * rx0 * left_s, eye_y, right_x - 0.32 * rx0 * right_s, eye_y,
                          rim_w)
        canvas = _paint(canvas, bridge, FRAME_RGB)
    return canvas


def render_clip(attributes: dict[str, str], num_frames: int, resolution: int, seed: int,
                aligned_motion: bool = False) -> np.ndarray:
    """Draw one clip as uint8 ``(num_frames, resolution, resolution, 3)``; deterministic for a seed.
    aligned_motion: every periodic action at one rhythm and phase (module docstring)."""
    _check_attributes(attributes)
    if num_frames < 1 or resolution < 16:
        raise ValueError(f"need num_frames >= 1 and resolution >= 16, got {num_frames}, {resolution}")
    # Two streams, so that the same seed gives the same person and scene whatever the action.
    rng, motion_rng = np.random.default_rng(seed).spawn(2)
    size = resolution
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)[:, None]  # each (1, H, W)
    skin = _tint(SKIN_RGB[attributes["skin_tone"]], rng)
    hair = _tint(HAIR_RGB[attributes["hair_color"]], rng)
    pose = _motion(attributes["action"], num_frames, motion_rng, aligned_motion)
    yaw = pose["yaw"]

    # Head: about half the frame high; per-clip jitter of position and size.
    scale = size * rng.uniform(0.94, 1.06)
    rx0, ry = 0.185 * scale, 0.245 * scale
    cx = size * (0.5 + rng.uniform(-0.04, 0.04)) + 0.06 * size * yaw
    cy = size * (0.42 + rng.uniform(-0.03, 0.03)) + 0.06 * size * pose["nod"]
    features_x = cx + 0.45 * rx0 * yaw  # eyes, nose and mouth slide towards the turn
    features_y = cy + 0.03 * size * pose["nod"]  # and dip a little further when nodding down

    canvas = _background(attributes["background"], x, y, size, rng)
    body_x = size * 0.5 + 0.3 * (cx.mean() - size * 0.5)
    shirt = _tint(SHIRT_RGB[rng.integers(len(SHIRT_RGB))], rng, 0.08)
    canvas = _paint(canvas, _ellipse(x, y, body_x, size * 1.02, 0.44 * size, 0.2 * size), shirt)
    hair_x = cx - 0.25 * rx0 * yaw  # the back of the head shows on the side turned away
    if attributes["hair_length"] == "long":
        long_hair = _rounded_box(x, y, hair_x, cy + 0.45 * ry, 1.3 * rx0, 0.95 * ry, 0.5 * rx0)
        canvas = _paint(canvas, long_hair, hair)
    neck = _rounded_box(x, y, body_x, cy + 1.05 * ry, 0.42 * rx0, 0.6 * ry, 0.1 * rx0)
    canvas = _paint(canvas, neck, skin * 0.85)
    canvas = _paint(canvas, _ellipse(x, y, hair_x, cy - 0.1 * ry, 1.12 * rx0, 1.06 * ry), hair)
    canvas = draw_face(canvas, x, y, cx=cx, cy=cy, features_x=features_x, features_y=features_y, rx0=rx0, ry=ry,
                       skin=skin, hair=hair, emotion=attributes["emotion"], glasses=attributes["glasses"] == "glasses",
                       beard=attributes["beard"] == "beard", yaw=yaw, eyes=pose["eyes"], mouth=pose["mouth"])

    canvas = canvas * LIGHTING_GAIN[attributes["lighting"]]
    canvas = np.broadcast_to(canvas, (num_frames, size, size, 3))
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- dataset generation


def _clip_id(index: int) -> str:
    return f"synth_{index:05d}"


def _make_clip(job: tuple) -> ClipRecord:
    """Render and write clip `index` (unless a complete file is already there); returns its record."""
    out_dir, index, num_frames, resolution, fps, seed, captions_per_clip, aligned_motion = job
    rng = np.random.default_rng([seed, index])  # clip i depends on (seed, i) only
    attributes = sample_attributes(rng)
    render_seed = int(rng.integers(2**63))
    captions = [caption_for(attributes, rng) for _ in range(captions_per_clip)]
    video = Path(out_dir) / "clips" / f"{_clip_id(index)}.mp4"
    if not video.is_file():  # files are written atomically: one that exists is complete
        write_video(video, render_clip(attributes, num_frames, resolution, render_seed, aligned_motion), fps)
    return ClipRecord(clip_id=_clip_id(index), video=str(video), captions=captions, attributes=attributes,
                      fps=float(fps), extra={"source": "facevid-synth"})


def generate(out_dir: str | os.PathLike, num_clips: int, num_frames: int = 16, resolution: int = 64,
             fps: float = 12.0, seed: int = 0, captions_per_clip: int = 2, aligned_motion: bool = False,
             workers: int = 1, progress: bool = True) -> Path:
    """Write `num_clips` clips to out_dir/clips/*.mp4 and out_dir/manifest.jsonl; returns the manifest.

    synth_info.json records the arguments: a re-run with the same ones returns at once when the
    manifest and every clip exist, and renders only missing clips after an interrupted run. With
    other arguments, the previous FaceVid-Synth files in out_dir are replaced.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    out_dir = Path(out_dir).resolve()
    manifest = out_dir / "manifest.jsonl"
    info_path = out_dir / "synth_info.json"
    info = {"version": SYNTH_VERSION, "num_clips": num_clips, "num_frames": num_frames,
            "resolution": resolution, "fps": float(fps), "seed": seed, "captions_per_clip": captions_per_clip,
            "aligned_motion": aligned_motion}
    clip_paths = [out_dir / "clips" / f"{_clip_id(i)}.mp4" for i in range(num_clips)]

    previous = json.loads(info_path.read_text()) if info_path.is_file() else None
    if previous == info and manifest.is_file() and all(p.is_file() for p in clip_paths):
        return manifest
    if previous != info:  # clips on disk were drawn with other arguments: start over
        manifest.unlink(missing_ok=True)
        for stale in (out_dir / "clips").glob("synth_*.mp4"):
            stale.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps(info, indent=2) + "\n")

    jobs = [(str(out_dir), i, num_frames, resolution, fps, seed, captions_per_clip, aligned_motion)
            for i in range(num_clips)]
    bar = {"total": num_clips, "desc": "FaceVid-Synth", "unit": "clip", "disable": not progress}
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            records = list(tqdm(pool.map(_make_clip, jobs, chunksize=16), **bar))
    else:
        records = [_make_clip(job) for job in tqdm(jobs, **bar)]
    return write_manifest(manifest, records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the FaceVid-Synth dataset (mp4 clips + manifest).")
    parser.add_argument("--out", required=True, help="output folder (clips/ and manifest.jsonl go here)")
    parser.add_argument("--num-clips", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--resolution", type=int, default=64, help="square frame size in pixels")
    parser.add_argument("--fps", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions-per-clip", type=int, default=2)
    parser.add_argument("--aligned-motion", action="store_true",
                        help="every periodic action at one rhythm, from the rest pose at frame 0")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    manifest = generate(args.out, args.num_clips, num_frames=args.frames, resolution=args.resolution,
                        fps=args.fps, seed=args.seed, captions_per_clip=args.captions_per_clip,
                        aligned_motion=args.aligned_motion,
                        workers=args.workers)
    print(manifest)


if __name__ == "__main__":
    main()
