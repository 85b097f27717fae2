"""Feature extractors for FVD (I3D), FID (Inception) and CLIP scores, from local weight files only.

- I3D: the TorchScript `i3d_torchscript.pt` of StyleGAN-V / content-debiased FVD, called as
  ``model(videos, rescale=False, resize=False, return_features=True)`` on float videos in [-1, 1],
  (B, 3, T, 224, 224): frames resized (short side, bilinear) and center-cropped to 224 here. Its
  last pooling needs T >= 16: shorter videos are stretched to 16 frames by repeating frames.
- Inception: the TorchScript `inception-2015-12-05.pt` of StyleGAN2-ADA / StyleGAN-V / clean-fid (a
  direct translation of the TF FID network), called as ``model(images, return_features=True)`` on
  uint8 (N, 3, H, W) images; it resizes to 299 itself. The pytorch-fid state dict is not accepted.
- CLIP: any transformers CLIPModel (hub id or local folder) with its CLIPProcessor.

A missing file is an error that names the file, the CLI flag and the eval config key: a metric is
never computed with a substitute.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
I3D_MIN_FRAMES = 16


class MissingWeightsError(FileNotFoundError):
    """A metric's weights are not where the config says; the message says what to put where."""


@dataclass(frozen=True)
class _Weights:
    metric: str
    flag: str
    field: str
    file: str
    url: str
    what: str


_I3D = _Weights("FVD", "--i3d", "eval.i3d", I3D_FILE, I3D_URL,
                "the I3D TorchScript of StyleGAN-V / content-debiased FVD")
_INCEPTION = _Weights("FID", "--inception", "eval.inception", INCEPTION_FILE, INCEPTION_URL,
                      "the FID Inception TorchScript of StyleGAN2-ADA / StyleGAN-V / clean-fid")


def _missing(weights: _Weights, path: Path, reason: str = "not found") -> MissingWeightsError:
    return MissingWeightsError(
        f"{weights.metric} needs {weights.what}, '{weights.file}': {path} {reason}. Download {weights.url} "
        f"and put it at {path}, or pass its location with {weights.flag} PATH ({weights.field}); "
        f"or leave {weights.metric} out of --metrics.")


def _load_torchscript(path: str | os.PathLike, weights: _Weights, device) -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise _missing(weights, path)
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as err:  # e.g. a plain state dict (pytorch-fid's .pth) instead of TorchScript
        raise _missing(weights, path, f"is not a TorchScript file ({str(err).splitlines()[0][:120]})") from err


def file_sha256(path: str | os.PathLike) -> str:
    """The weights file's SHA-256: part of every FVD / FID protocol, since other files give other numbers."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _batches(items, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def resize_short_side_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size): bilinear resize of the short side, center crop."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    frames = F.interpolate(frames, size=target, mode="bilinear", align_corners=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    return frames[..., top:top + size, left:left + size]


def stretch_frames(video: np.ndarray, min_frames: int) -> np.ndarray:
    """Repeat frames (nearest index) so that the clip has at least `min_frames` frames."""
    if len(video) >= min_frames:
        return video
    index = np.floor(np.arange(min_frames) * len(video) / min_frames).astype(int)
    return video[index]


class I3DFeatures:
    """FVD features: (N, T, H, W, 3) uint8 videos -> (N, 400) I3D logits before the softmax."""

    def __init__(self, path: str | os.PathLike, device="cpu", batch_size: int = 8):
        self.model = _load_torchscript(path, _I3D, device)
        self.file, self.sha256 = str(Path(path).resolve()), file_sha256(path)
        self.device, self.batch_size = torch.device(device), batch_size

    def frames_used(self, num_frames: int) -> int:
        return max(num_frames, I3D_MIN_FRAMES)

    @torch.no_grad()
    def __call__(self, videos: np.ndarray) -> np.ndarray:
        out = []
        for batch in _batches(videos, self.batch_size):
            clips = []
            for video in batch:
                video = torch.from_numpy(stretch_frames(np.asarray(video), I3D_MIN_FRAMES)).to(self.device)
                frames = video.permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W) in [0, 1]
                frames = resize_short_side_center_crop(frames, 224) * 2 - 1
                clips.append(frames.permute(1, 0, 2, 3))  # (3, T, 224, 224)
            features = self.model(torch.stack(clips), rescale=False, resize=False, return_features=True)
            out.append(features.float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)


class InceptionFeatures:
    """FID features: (N, H, W, 3) uint8 frames -> (N, 2048) Inception pool features."""

    def __init__(self, path: str | os.PathLike, device="cpu", batch_size: int = 32):
        self.model = _load_torchscript(path, _INCEPTION, device)
        self.file, self.sha256 = str(Path(path).resolve()), file_sha256(path)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for batch in _batches(frames, self.batch_size):
            images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(self.device)
            out.append(self.model(images, return_features=True).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)


class ClipFeatures:
    """Unit-norm CLIP embeddings of prompts and of frames, from a CLIPModel hub id or local folder."""

    def __init__(self, name_or_path: str, device="cpu", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise MissingWeightsError(
                f"the CLIP score needs a CLIPModel with its processor: '{name_or_path}' could not be loaded "
                f"({str(err).splitlines()[0][:160]}). Pass a local folder (CLIPModel.save_pretrained + "
                f"CLIPProcessor.save_pretrained) or a hub id reachable from here with --clip "
                f"(eval.clip); or leave clip out of --metrics.") from err
        self.name = name_or_path
        self.context_length = self.model.config.text_config.max_position_embeddings
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def text(self, prompts: list[str]) -> np.ndarray:
        out = []
        for batch in _batches(list(prompts), self.batch_size):
            # CLIP reads at most its context length (77 tokens); longer prompts are truncated.
            tokens = self.processor(text=batch, return_tensors="pt", padding=True, truncation=True,
                                    max_length=self.context_length).to(self.device)
            out.append(_unit(self.model.get_text_features(**tokens)))
        return np.concatenate(out)

    @torch.no_grad()
    def images(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for batch in _batches(frames, self.batch_size):
            pixels = self.processor(images=list(batch), return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_unit(self.model.get_image_features(pixel_values=pixels)))
        return np.concatenate(out)


def _unit(features) -> np.ndarray:
    # transformers 5 may wrap the projected embedding in an output object
    features = features if torch.is_tensor(features) else features.pooler_output
    features = features.float().cpu().numpy().astype(np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
