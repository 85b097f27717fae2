"""Evaluation's pictures: generated-vs-real contact sheets. (Training curves: facevid/curves.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.video import save_contact_sheet


def comparison_sheet(path: str | Path, generated: np.ndarray, real: np.ndarray | None, prompts: list[str],
                     count: int = 8, real_label: str = "real") -> Path:
    """Contact sheet: each generated video (labelled with its prompt) above its real counterpart."""
    videos, labels = [], []
    for i in range(min(count, len(generated))):
        videos.append(generated[i])
        labels.append(f"generated {i}: {prompts[i]}")
        if real is not None:
            videos.append(real[i])
            labels.append(f"{real_label} {i}")
    return save_contact_sheet(path, videos, labels)
