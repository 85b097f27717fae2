"""A run's training curves from RUN/metrics.jsonl (loss, lr, validation and evaluation numbers), drawn with
Pillow (no plotting library needed). The trainer redraws them at every validation.

    python -m facevid.curves runs/demo      # -> runs/demo/plots/training_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_SKIP = {"step", "epoch", "elapsed_s"}  # bookkeeping, not curves
_PANEL = (440, 250)
_MARGIN = {"left": 62, "right": 16, "top": 28, "bottom": 34}
_LINE = (31, 119, 180)


def read_curves(metrics_file: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (steps, values)} for every numeric key of metrics.jsonl rows ({"step": ..., key: value});
    training rows and validation rows ("val/..."), evaluation rows ("eval/...") alike."""
    points: dict[str, list[tuple[float, float]]] = {}
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "step" not in row:
            continue
        for key, value in row.items():
            if key not in _SKIP and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                points.setdefault(key, []).append((float(row["step"]), float(value)))
    return {k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in points.items()}


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    return [t for t in np.arange(math.ceil(low / step) * step, high + step / 2, step) if low <= t <= high]


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _panel(title: str, steps: np.ndarray, values: np.ndarray) -> Image.Image:
    return overlay_panel(title, {"": (steps, values)})


# Colours of overlaid series, in order (matplotlib's first four).
_LINES = (_LINE, (255, 127, 14), (44, 160, 44), (214, 39, 40))


def overlay_panel(title: str, series: dict[str, tuple[np.ndarray, np.ndarray]], x_label: str = "step"
                  ) -> Image.Image:
    """One panel with one line per {label: (x, y)} on shared axes (a legend when labelled), e.g. two runs'
    losses against training FLOPs (bench/unet_vs_dit.py)."""
    width, height = _PANEL
    image = Image.new("RGB", _PANEL, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = width - _MARGIN["right"], height - _MARGIN["bottom"]
    every_x = np.concatenate([np.asarray(x, dtype=float) for x, _ in series.values()])
    every_y = np.concatenate([np.asarray(y, dtype=float) for _, y in series.values()])
    # Loss-like curves spanning more than a decade read better on a log axis.
    log = bool((every_y > 0).all() and every_y.max() / every_y.min() > 10)
    shown = np.log10(every_y) if log else every_y
    y_low, y_high = float(shown.min()), float(shown.max())
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_low, x_high = float(every_x.min()), float(max(every_x.max(), every_x.min() + 1))
    to_x = lambda s: left + (s - x_low) / (x_high - x_low) * (right - left)  # noqa: E731
    to_y = lambda v: bottom - (v - y_low) / (y_high - y_low) * (bottom - top)  # noqa: E731

    draw.text((left, 8), title + (" (log scale)" if log else ""), fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    for tick in _ticks(y_low, y_high):
        y = to_y(tick)
        draw.line([left, y, right, y], fill=(230, 230, 230))
        draw.text((4, y - 6), _format(10**tick if log else tick), fill="black", font=font)
    for tick in _ticks(x_low, x_high):
        x = to_x(tick)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 10, bottom + 8), _format(tick), fill="black", font=font)
    draw.text((right - 6 * len(x_label), height - 14), x_label, fill=(90, 90, 90), font=font)
    for i, (label, (steps, values)) in enumerate(series.items()):
        colour = _LINES[i % len(_LINES)]
        values = np.asarray(values, dtype=float)
        xy = [(to_x(s), to_y(v)) for s, v in zip(steps, np.log10(values) if log else values)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        if len(xy) <= 30:  # few points (validation, evaluation): mark each
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if label:
            draw.text((right - 80, top + 6 + 12 * i), label, fill=colour, font=font)
    return image


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None, columns: int = 2) -> Path | None:
    """One panel per metric of RUN/metrics.jsonl (loss first) -> RUN/plots/training_curves.png.
    None when the run has no metrics yet."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        return None
    curves = read_curves(metrics_file)
    if not curves:
        return None
    keys = sorted(curves, key=lambda k: (k != "loss", "/" in k, k))
    panels = [_panel(k, *curves[k]) for k in keys]
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (columns * _PANEL[0], rows * _PANEL[1]), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * _PANEL[0], (i // columns) * _PANEL[1]))
    out = Path(out) if out else run_dir / "plots" / "training_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plot a run's training curves from RUN/metrics.jsonl.")
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", help="PNG path (default RUN/plots/training_curves.png)")
    args = parser.parse_args(argv)
    path = plot_training_curves(args.run, args.out)
    print(path if path else f"{args.run} has no metrics.jsonl rows yet")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main())
