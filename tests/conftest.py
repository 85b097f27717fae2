import os

import numpy as np
import pytest

# Tests never touch the network: everything they load ships with the packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def smooth_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3): soft gradients that brighten a little every frame (so all frames differ)."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.linspace(0, 1, height), np.linspace(0, 1, width),
                          indexing="ij")
    t = t * min(4.0, 180.0 / num_frames)  # brightness step per frame, small enough never to saturate
    red = 20 + t + 40 * x + 20 * y
    green = 90 + 60 * np.sin(np.pi * x) + 0.5 * t
    blue = 220 - 30 * y - t
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).round().astype(np.uint8)


@pytest.fixture
def single_thread():
    """torch on one thread for the test (files of tiny-model tests use it for every test via pytestmark)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_video(tmp_path):
    """make_video(name, num_frames=16, height=32, width=32, fps=12.0) -> (path, frames) of an mp4."""
    from data.video import write_video

    def make(name: str = "clip.mp4", num_frames: int = 16, height: int = 32, width: int = 32,
             fps: float = 12.0):
        frames = smooth_frames(num_frames, height, width)
        return write_video(tmp_path / name, frames, fps), frames

    return make
