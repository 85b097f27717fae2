"""FaceVid-Synth alignment probe: recover a clip's attributes from its pixels alone.

Analytic, nothing trained: the probe knows how data/synth.py draws a clip (palette, head geometry,
motions) and reads every attribute where the renderer puts it, with robust statistics so that it
survives VAE blur, colour casts, noise and video compression. Clips of any size are probed at 64x64.

1. Scene: background class from the chromaticity of two border strips the head never reaches; a
   per-channel gain from the same strips against the known wall colours. The gain's mean is the
   lighting (dim scales the whole image by 0.55); dividing by the gain also removes colour casts.
2. Head: foreground = nearer to a person colour than to the background. The top of the foreground
   and the centre of its hair cap track the head in every frame.
3. Colours: hair = colour mode of the cap, skin = colour mode of the neck (a clean patch of
   skin x 0.85 that blur cannot mix with facial features). Nearest palette entry wins.
4. Hair length: hair or background beside the jaw, where only long hair reaches.
5. Glasses, beard, emotion: analysis by synthesis on a frontal, eyes-open, mouth-closed image.
   The face interior is redrawn with data/synth.py's own face renderer (draw_face) for each hypothesis
   (with / without glasses; 4 emotions x beard / no beard), fitted over small shifts and blurs;
   the best fit wins. The eye fit also pins the face's position to half a pixel.
6. Action: vertical head motion (nodding); the drift of the mirror-symmetry axis of the eyes and
   mouth (turning); else every frame's change is projected on the rendered change of a blink and
   of an opening mouth (matched filters): blinking, talking, or still when neither is clear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from data import synth

SIZE = 64  # every clip is probed at 64x64: the geometry below is in these pixels
# Nominal head radii (render_clip: 0.185 and 0.245 x resolution, each clip within +-6%).
RX0, RY = 0.185 * SIZE, 0.245 * SIZE

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
_U, _V = _X / SIZE, _Y / SIZE
# Strips at the left and right edges, above the grass / floor line: always background.
_BORDER = (_V < 0.62) & (_Y > 2) & (((_U < 0.14) & (_X > 2)) | ((_U > 0.86) & (_X < SIZE - 2)))


def _glow(lamp_x: float) -> np.ndarray:
    return (25.0 * np.exp(-((_U - lamp_x) ** 2 + (_V - 0.2) ** 2) / 0.03))[..., None]


def _flat(rgb) -> np.ndarray:
    return np.broadcast_to(np.float32(rgb), (SIZE, SIZE, 3))


# Background colour maps as data/synth.py's _background draws them in bright light; a background
# pixel is near one of its class's maps. The first map is the class's reference colour.
_BACKGROUNDS: dict[str, list[np.ndarray]] = {
    "white wall": [np.stack([232 - 10 * _V, 232 - 10 * _V, 226 - 10 * _V], -1)],  # shaded towards the floor
    "green park": [_flat((92, 165, 78)), _flat((58.4, 127.4, 54)), _flat((51.7, 120, 48.8)),  # grass, trees
                   _flat((66, 140, 46))],
    "blue studio": [np.float32([70, 105, 200]) * (1 - 0.75 * np.hypot(_U - 0.5, _V - 0.4))[..., None]],
    "orange room": [np.float32([228, 138, 58]) + _glow(0.12), np.float32([228, 138, 58]) + _glow(0.88),
                    _flat((170, 92, 40))],  # lamp on either side, floor
}
# Bright and dim differ by a factor 0.55; a green park's border can be mostly tree crowns (0.72 of
# the grass), so its threshold sits lower.
_DIM_BELOW = {"white wall": 0.74, "green park": 0.64, "blue studio": 0.74, "orange room": 0.74}

_HAIR = np.float32([synth.HAIR_RGB[v] for v in synth.ATTRIBUTES["hair_color"]])
_SKIN = np.float32([synth.SKIN_RGB[v] for v in synth.ATTRIBUTES["skin_tone"]])
_PERSON = np.concatenate([_HAIR, _HAIR * 0.85, _SKIN, _SKIN * 0.85, np.float32(synth.SHIRT_RGB)])

_EYE_WINDOW = (-0.24, 0.19, -0.85, 0.85)  # around (fx, fy): rows in RY, columns in RX0 (eyes, rims, bridge)
_MOUTH_WINDOW = (0.26, 1.0, -0.8, 0.8)  # mouth, lips area and beard, inside the face outline


@dataclass
class ProbeResult:
    attributes: dict[str, str]
    measurements: dict[str, float] = field(default_factory=dict)  # the numbers behind each decision


def probe_clip(frames: np.ndarray) -> ProbeResult:
    """Recover every FaceVid-Synth attribute of one clip, uint8 (T, H, W, 3), from its pixels."""
    frames = _canonical(frames)
    background, gain, level = _scene(frames)
    pixels = frames / gain  # lighting and colour cast removed: comparable with the renderer's palette
    head = _track_head(pixels, background)
    hair = _colour_mode(pixels[head.cap], _HAIR)
    skin = _colour_mode(pixels[head.neck], _SKIN * 0.85) / 0.85
    long_share = float(head.foreground[head.beside_jaw].mean()) if head.beside_jaw.any() else 0.0
    action, face, measurements = _action_and_face(pixels, head, skin, hair)
    attributes = {
        "skin_tone": _nearest(skin, _SKIN, "skin_tone"),
        "hair_color": _nearest(hair, _HAIR, "hair_color"),
        "hair_length": "long" if long_share > 0.5 else "short",
        "glasses": face["glasses"],
        "beard": face["beard"],
        "emotion": face["emotion"],
        "background": background,
        "lighting": "dim" if level < _DIM_BELOW[background] else "bright",
        "action": action,
    }
    return ProbeResult(attributes, {"light_level": level, "long_hair_share": long_share, **measurements})


def probe_attributes(frames: np.ndarray) -> dict[str, str]:
    return probe_clip(frames).attributes


# ----------------------------------------------------------------------------- scene


def _canonical(frames: np.ndarray) -> np.ndarray:
    from data.video import center_crop_resize

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
        raise ValueError(f"the probe needs uint8 frames (T >= 2, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] != (SIZE, SIZE):
        frames = center_crop_resize(frames, SIZE)
    return frames.astype(np.float32)


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    return rgb / np.maximum(rgb.sum(-1, keepdims=True), 1.0)


_BACKGROUND_CHROMA = {name: _chromaticity(np.median(maps[0][_BORDER], 0)) for name, maps in _BACKGROUNDS.items()}


def _scene(frames: np.ndarray) -> tuple[str, np.ndarray, float]:
    """(background, per-channel gain, mean gain) from the border strips."""
    border = frames[:, _BORDER].reshape(-1, 3)
    chroma = np.median(_chromaticity(border), 0)
    name = min(_BACKGROUND_CHROMA, key=lambda k: float(np.abs(_BACKGROUND_CHROMA[k] - chroma).sum()))
    reference = np.broadcast_to(_BACKGROUNDS[name][0][_BORDER], frames[:, _BORDER].shape).reshape(-1, 3)
    if name == "green park":  # tree crowns are darker than the grass colour: keep the brightest pixels
        brightness = border.sum(1)
        keep = brightness >= np.percentile(brightness, 95)
        border, reference = border[keep], reference[keep]
    gain = np.maximum(np.median(border / reference, 0), 0.05)
    mean_ref = reference.mean(0)
    return name, gain.astype(np.float32), float((gain * mean_ref).sum() / mean_ref.sum())


def _sq_distance(planes: list[np.ndarray], colour) -> np.ndarray:
    """Squared RGB distance of every pixel (given as its three colour planes) to `colour`, an RGB
    triple or an (H, W, 3) map. Plane by plane: much faster than summing a last axis of 3."""
    colour = np.asarray(colour, np.float32)
    return sum((plane - colour[..., c]) ** 2 for c, plane in enumerate(planes))


def _min_sq_distance(pixels: np.ndarray, colours) -> np.ndarray:
    """Squared RGB distance from every pixel to its nearest colour in `colours`."""
    planes = [np.ascontiguousarray(pixels[..., c]) for c in range(3)]
    return np.min([_sq_distance(planes, colour) for colour in colours], axis=0)


def _background_sq_distance(pixels: np.ndarray, background: str) -> np.ndarray:
    return _min_sq_distance(pixels, _BACKGROUNDS[background])


def _foreground(pixels: np.ndarray, background: str) -> np.ndarray:
    """Pixels nearer to some hair / skin / shirt colour than to the background."""
    return _background_sq_distance(pixels, background) > _min_sq_distance(pixels, _PERSON)


def _colour_mode(pixels: np.ndarray, starts: np.ndarray, bandwidth: float = 18.0) -> np.ndarray:
    """Densest colour among `pixels` (N, 3), by mean shift from each palette entry: blur mixes a
    patch with its neighbours, but its own colour stays the densest."""
    if len(pixels) == 0:
        return np.float32(starts.mean(0))
    best, best_density = starts[0], -1.0
    for mode in starts:
        for _ in range(12):
            weights = np.exp(-((pixels - mode) ** 2).sum(-1) / (2 * bandwidth**2))
            mode = (weights[:, None] * pixels).sum(0) / max(weights.sum(), 1e-6)
        density = float(np.exp(-((pixels - mode) ** 2).sum(-1) / (2 * bandwidth**2)).sum())
        if density > best_density:
            best, best_density = mode, density
    return np.float32(best)


def _nearest(colour: np.ndarray, table: np.ndarray, attribute: str) -> str:
    return synth.ATTRIBUTES[attribute][int(np.argmin(((table - colour) ** 2).sum(-1)))]


# ----------------------------------------------------------------------------- head


@dataclass
class _Head:
    top: np.ndarray  # (T,) first row of the hair
    x: np.ndarray  # (T,) centre of the hair cap
    cy: np.ndarray  # (T,) face centre row, from the top at nominal head size
    foreground: np.ndarray  # (T, H, W) masks
    cap: np.ndarray
    neck: np.ndarray
    beside_jaw: np.ndarray


def _band(rows_from: np.ndarray, y0: float, y1: float, centre_x: np.ndarray, x0: float, x1: float,
          mirrored: bool = False) -> np.ndarray:
    """(T, H, W) mask: rows rows_from + [y0, y1) RY, columns centre_x + [x0, x1) RX0 (|dx| if mirrored)."""
    rows = (_Y >= rows_from[:, None, None] + y0 * RY) & (_Y < rows_from[:, None, None] + y1 * RY)
    dx = _X - centre_x[:, None, None]
    dx = np.abs(dx) if mirrored else dx
    return rows & (dx >= x0 * RX0) & (dx < x1 * RX0)


def _track_head(pixels: np.ndarray, background: str) -> _Head:
    fg = _foreground(pixels, background)
    coverage = fg[:, :, SIZE // 4: 3 * SIZE // 4].mean(-1)  # (T, H): central columns
    has_head = (coverage > 0.2).any(1)
    nominal_top = 0.42 * SIZE - 1.16 * RY
    top = np.where(has_head, np.argmax(coverage > 0.2, axis=1), nominal_top).astype(np.float32)
    cap_rows = (_Y >= top[:, None, None]) & (_Y < top[:, None, None] + 0.45 * RY) & (np.abs(_X - SIZE / 2) < 0.36 * SIZE)
    weights = (fg & cap_rows).sum((1, 2))
    x = np.where(weights > 0, ((fg & cap_rows) * _X).sum((1, 2)) / np.maximum(weights, 1), SIZE / 2)
    cy = top + 1.16 * RY  # the hair ellipse reaches 1.16 RY above the face centre
    # The neck between chin (or beard) and shirt is clean skin x 0.85 in every clip.
    neck = (_Y >= cy[:, None, None] + 1.15 * RY) & (_Y < 0.8 * SIZE) & (np.abs(_X - SIZE / 2) < 2)
    return _Head(
        top=top, x=x.astype(np.float32), cy=cy, foreground=fg,
        cap=_band(top, 0.12, 0.42, x, -0.45, 0.45) & fg,
        neck=neck,
        beside_jaw=_band(cy, 0.5, 1.0, x, 1.0, 1.2, mirrored=True),
    )


# ----------------------------------------------------------------------------- action


def _symmetry_axis(pixels: np.ndarray, head: _Head) -> np.ndarray:
    """(T,) column about which the eyes and mouth are mirror-symmetric. They slide towards a turn
    three times as far as the hair moves, so this axis leads a turn. Tracked from frame to frame:
    a far-turned face has other, spurious symmetries."""
    offsets = np.arange(1.0, 0.5 * RX0, 1.0)  # inner features only: the outline is symmetric about another axis
    axes = np.empty(len(pixels), np.float32)
    for t, frame in enumerate(pixels):
        # At least one row, also for a head tracked at or past the bottom edge (seen in generated videos).
        r0, r1 = (int(np.clip(head.cy[t] + k * RY, 0, SIZE - 1)) for k in (-0.35, 0.75))
        band = frame[r0:max(r1, r0 + 1)]
        search = np.arange(-10.0, 10.01, 0.5) + head.x[t] if t == 0 else np.arange(-2.5, 2.51, 0.5) + axes[t - 1]
        left, right = _sample_columns(band, search[:, None] - offsets), _sample_columns(band, search[:, None] + offsets)
        score = ((left - right) ** 2).sum(-1).mean((0, 2))
        # A faint pull towards the search centre settles ties (a flat image): no motion then.
        axes[t] = search[int(np.argmin(score + 1e-3 * np.abs(search - search.mean())))]
    return axes


def _sample_columns(band: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """band (R, W, 3) linearly interpolated at x `positions` (pixel-centre coordinates)."""
    idx = np.clip(positions - 0.5, 0, band.shape[1] - 1.001)
    i0 = idx.astype(int)
    w = (idx - i0)[None, ..., None]
    return band[:, i0] * (1 - w) + band[:, i0 + 1] * w


def _noise_level(pixels: np.ndarray, median: np.ndarray, fx: float, fy: float) -> float:
    """Per-pixel temporal noise (robust sigma) on the cheeks, where nothing moves in any action:
    the scale for blink and mouth changes (measured on the face, as video codecs and VAEs treat
    a face differently from a flat wall)."""
    cheeks = _box(fx, fy, 0.12, 0.32, -0.75, -0.15) | _box(fx, fy, 0.12, 0.32, 0.15, 0.75)
    residual = pixels[:, cheeks] - median[cheeks]
    residual = (residual - residual.mean(1, keepdims=True)).reshape(-1)  # without global flicker
    return float(1.4826 * np.median(np.abs(residual - np.median(residual)))) if residual.size else 0.0


def _box(fx: float, fy: float, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """(H, W) mask: rows fy + [y0, y1) RY, columns fx + [x0, x1) RX0."""
    return (_Y >= fy + y0 * RY) & (_Y < fy + y1 * RY) & (_X >= fx + x0 * RX0) & (_X < fx + x1 * RX0)


def _change_pattern(box, fx, fy, blur, face: dict, **change) -> np.ndarray:
    """How `change` (eyes_open=0, talk=1) alters the face's colours in `box`, as the renderer draws it."""
    pad = 3
    return (_draw(box, fx, fy, blur, pad, **face, **change) - _draw(box, fx, fy, blur, pad, **face))[pad:-pad, pad:-pad]


def _matched_change(pixels, reference, box, pattern) -> tuple[float, np.ndarray]:
    """How much of `pattern` the second most changed frame shows, projecting each frame's difference
    from `reference` on it (a matched filter: the optimal detector against pixel noise); 1 = the
    whole change. Second, not first: a blink closes the eyes for two frames. Also returns the
    per-frame projections."""
    amounts = ((pixels[:, box[0], box[1]] - reference[box]) * pattern).sum((1, 2, 3))
    return float(np.sort(np.abs(amounts))[-2]) / max(float((pattern**2).sum()), 1e-6), amounts


def _action_and_face(pixels: np.ndarray, head: _Head, skin, hair) -> tuple[str, dict, dict]:
    """The action, and glasses / beard / emotion fitted on a frontal, eyes-open, mouth-closed image."""
    nod = float(np.ptp(head.top))  # nodding moves the head by +-0.06 x resolution
    axis = _symmetry_axis(pixels, head)
    # Median step x steps: robust to the tracker losing the axis for a frame.
    drift = float(np.median(np.diff(axis - head.x)) * (len(pixels) - 1))
    measurements = {"nod_px": nod, "turn_drift_px": drift}
    if nod > 4.0 or abs(drift) > 2.25:
        if nod > 4.0:
            action, t = "nodding", int(np.argmin(np.abs(head.top - np.median(head.top))))  # the head halfway
        else:  # FaceVid-Synth turns start from a frontal face
            action, t = ("turning left" if drift < 0 else "turning right"), 0
        glasses, fx, fy, blur, eye_fit = _fit_eyes(pixels[t], float(head.x[t]), float(head.cy[t]), skin, hair)
        fits = _fit_lower_face(pixels[t], fx, fy, skin, hair, glasses, blur)
        return action, _face_verdict(glasses, fits), {**measurements, **eye_fit, **_margins(fits)}

    # The head stays in place: fit the face on the median frame (noise averaged), then project every
    # frame's change on what a blink and what talking would change there.
    median = np.median(pixels, 0)
    glasses, fx, fy, blur, eye_fit = _fit_eyes(median, float(np.median(head.x)), float(np.median(head.cy)),
                                                skin, hair)
    fits = _fit_lower_face(median, fx, fy, skin, hair, glasses, blur)
    face = {"skin": skin, "hair": hair, **_render_kwargs(_face_verdict(glasses, fits))}
    eye_box, mouth_box = _window(fx, fy, _EYE_WINDOW), _window(fx, fy, _MOUTH_WINDOW)
    blink_pattern = _change_pattern(eye_box, fx, fy, blur, face, eyes_open=0.0)
    talk_pattern = _change_pattern(mouth_box, fx, fy, blur, face, talk=1.0)
    blink, _ = _matched_change(pixels, median, eye_box, blink_pattern)
    talk, talk_per_frame = _matched_change(pixels, median, mouth_box, talk_pattern)
    noise = max(_noise_level(pixels, median, fx, fy), 0.5)
    blink_snr = blink * float(np.sqrt((blink_pattern**2).sum())) / noise
    talk_snr = talk * float(np.sqrt((talk_pattern**2).sum())) / noise
    # A change must be a clear part of a full blink / opening, and clear of the noise.
    eyes = blink / 0.12 if blink_snr > 3.5 else 0.0
    mouth = talk / 0.08 if talk_snr > 3.5 else 0.0
    action = "still" if max(eyes, mouth) < 1.0 else "blinking" if eyes > mouth else "talking"
    if action == "talking":  # refit on the most closed mouth
        t = int(np.argmin(talk_per_frame))
        fits = _fit_lower_face(pixels[t], fx, fy, skin, hair, glasses, blur, talk_levels=(0.0, 0.12))
    measurements.update(blink=blink, talk=talk, blink_snr=blink_snr, talk_snr=talk_snr, noise=noise)
    return action, _face_verdict(glasses, fits), {**measurements, **eye_fit, **_margins(fits)}


def _face_verdict(glasses: str, lower_face_fits: dict) -> dict[str, str]:
    emotion, beard, _ = min(lower_face_fits, key=lambda k: lower_face_fits[k][0])
    return {"glasses": glasses, "emotion": emotion, "beard": beard}


def _render_kwargs(verdict: dict[str, str]) -> dict:
    return {"glasses": verdict["glasses"] == "glasses", "beard": verdict["beard"] == "beard",
            "emotion": verdict["emotion"]}


# ----------------------------------------------------------------------------- face interior


def _render_face(x, y, fx, fy, skin, hair, glasses=False, beard=False, emotion="neutral", talk=0.0,
                 eyes_open=1.0):
    """Colour of a frontal face centred at (fx, fy) on the pixel grid (x, y), at nominal size, on hair: what
    render_clip draws there (data/synth.py's draw_face)."""
    canvas = np.broadcast_to(np.float32(hair), x.shape + (3,))
    # Only draw what reaches the grid: the fits use small windows above or below the nose.
    upper, lower = float(y.min()) < fy + 0.2 * RY, float(y.max()) > fy + 0.2 * RY
    return synth.draw_face(canvas, x, y, cx=fx, cy=fy, features_x=fx, features_y=fy, rx0=RX0, ry=RY, skin=skin,
                           hair=hair, emotion=emotion, glasses=glasses, beard=beard, eyes=eyes_open, mouth=talk,
                           upper=upper, lower=lower)


def _window(fx: float, fy: float, window) -> tuple[slice, slice]:
    r0, r1 = (int(np.clip(round(fy + k * RY), 0, SIZE)) for k in window[:2])
    c0, c1 = (int(np.clip(round(fx + k * RX0), 0, SIZE)) for k in window[2:])
    return slice(r0, r1), slice(c0, c1)


def _draw(box: tuple[slice, slice], fx: float, fy: float, blur: float, pad: int = 3, **face) -> np.ndarray:
    """_render_face on `box` (plus `pad` pixels on each side), blurred."""
    rows, cols = box
    y, x = np.mgrid[rows.start - pad:rows.stop + pad, cols.start - pad:cols.stop + pad].astype(np.float32) + 0.5
    drawn = _render_face(x, y, fx, fy, **face)
    return gaussian_filter(drawn, (blur, blur, 0)) if blur else drawn


def _fit(image, fx, fy, window, hypotheses: dict, offsets_x, offsets_y, blurs, inside_face=False):
    """Best fit of each hypothesis (kwargs of _render_face) to `image` in `window` around (fx, fy),
    over the given offsets (multiples of half a pixel) and blurs. Each hypothesis is drawn once;
    offsets are crops of it, half pixels the mean of two neighbouring crops.
    Returns {name: (mean squared error, dx, dy, blur)}."""
    box = _window(fx, fy, window)
    observed = image[box]
    h, w = observed.shape[:2]
    if inside_face:  # outside the face is hair or background, which the hypotheses do not model
        weight = (((_X[box] - fx) / (0.92 * RX0)) ** 2 + ((_Y[box] - fy) / (0.92 * RY)) ** 2 < 1).astype(np.float32)
    else:
        weight = np.ones((h, w), np.float32)
    if weight.sum() == 0:
        return {name: (0.0, 0.0, 0.0, 0.0) for name in hypotheses}
    weight = weight / weight.sum()
    pad = int(max(np.abs(offsets_x).max(), np.abs(offsets_y).max())) + 4
    x, y = np.meshgrid(np.arange(box[1].start - pad, box[1].stop + pad, dtype=np.float32) + 0.5,
                       np.arange(box[0].start - pad, box[0].stop + pad, dtype=np.float32) + 0.5)
    # Whole and half pixel positions of the window inside the padded drawing, on a half-pixel grid.
    rows = (2 * (pad - np.asarray(offsets_y))).astype(int)
    cols = (2 * (pad - np.asarray(offsets_x))).astype(int)
    best = {}
    for name, face in hypotheses.items():
        drawn = _render_face(x, y, fx, fy, **face)
        for blur in blurs:
            template = _half_pixel_grid(gaussian_filter(drawn, (blur, blur, 0)) if blur else drawn)
            windows = np.lib.stride_tricks.sliding_window_view(template, (2 * h - 1, 2 * w - 1), axis=(0, 1))
            candidates = windows[rows][:, cols][..., ::2, ::2]  # (offsets y, offsets x, 3, h, w)
            errors = (((observed.transpose(2, 0, 1) - candidates) ** 2) * weight).sum((2, 3, 4))
            i, j = np.unravel_index(int(np.argmin(errors)), errors.shape)
            if name not in best or errors[i, j] < best[name][0]:
                best[name] = (float(errors[i, j]), float(offsets_x[j]), float(offsets_y[i]), blur)
    return best


def _half_pixel_grid(image: np.ndarray) -> np.ndarray:
    """(2H-1, 2W-1, C): the image with the means of neighbouring pixels in between."""
    rows = np.empty((2 * image.shape[0] - 1, *image.shape[1:]), image.dtype)
    rows[::2], rows[1::2] = image, (image[:-1] + image[1:]) / 2
    out = np.empty((rows.shape[0], 2 * image.shape[1] - 1, image.shape[2]), image.dtype)
    out[:, ::2], out[:, 1::2] = rows, (rows[:, :-1] + rows[:, 1:]) / 2
    return out


def _fit_eyes(image, fx, fy, skin, hair):
    """Glasses or not, and the face's exact position and blur, from the eye region."""
    hypotheses = {g: {"glasses": g == "glasses", "skin": skin, "hair": hair} for g in synth.ATTRIBUTES["glasses"]}
    fits = _fit(image, fx, fy, _EYE_WINDOW, hypotheses, offsets_x=np.arange(-1.5, 1.6, 0.5),
                offsets_y=np.arange(-3.0, 3.1, 0.5), blurs=(0.0, 1.1))
    glasses = min(fits, key=lambda k: fits[k][0])
    _, dx, dy, blur = fits[glasses]
    return glasses, fx + dx, fy + dy, blur, {"glasses_margin": _margin(fits, lambda k: k == glasses)}


def _fit_lower_face(image, fx, fy, skin, hair, glasses: str, blur: float, talk_levels=(0.0,)) -> dict:
    """{(emotion, beard, talk): fit} from the mouth region. The mouth sits at a fixed distance below
    the eyes, so only a vertical +-1 pixel is searched."""
    hypotheses = {(e, b, talk): {"emotion": e, "beard": b == "beard", "talk": talk, "glasses": glasses == "glasses",
                                 "skin": skin, "hair": hair}
                  for e in synth.ATTRIBUTES["emotion"] for b in synth.ATTRIBUTES["beard"] for talk in talk_levels}
    return _fit(image, fx, fy, _MOUTH_WINDOW, hypotheses, offsets_x=np.zeros(1), offsets_y=np.arange(-1.0, 1.1, 0.5),
                blurs=(blur,), inside_face=True)


def _margins(fits: dict) -> dict[str, float]:
    emotion, beard, _ = min(fits, key=lambda k: fits[k][0])
    return {"emotion_margin": _margin(fits, lambda k: k[0] == emotion), "beard_margin": _margin(fits, lambda k: k[1] == beard)}


def _margin(fits: dict, chosen) -> float:
    """How much worse the best rejected hypothesis fits than the best chosen one (>= 1)."""
    best = min(v[0] for k, v in fits.items() if chosen(k))
    rejected = min(v[0] for k, v in fits.items() if not chosen(k))
    return float(rejected / max(best, 1e-6))
