"""Tiny real runs for each task (t2v / i2v / uncond, from scratch or from a pretrained UNet3DConditionModel), each
trained once per test session and shared by the test files that use it (test_i2v, test_export).

The VAE is a randomly initialised tiny AutoencoderKL: these tests check plumbing and fidelity to the VAE's own
round trip, not image quality, so training one would only cost time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from diffusers import UNet3DConditionModel
from tiny import tiny_config

from data import synth
from facevid.stages import build_stage
from facevid.trainer import Trainer
from models.vae import build_tiny_vae

REPO = Path(__file__).resolve().parents[1]
_built: dict[str, Path] = {}


def entry_point(name: str):
    """A top-level script (sample.py, export.py) as a module, so tests call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"_{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _once(name: str, factory, build) -> Path:
    if name not in _built:
        _built[name] = build(factory.mktemp(name))
    return _built[name]


def synth_manifest(factory) -> Path:
    return _once("synth", factory, lambda out: synth.generate(out, num_clips=4, num_frames=8, resolution=32,
                                                              fps=8.0, seed=3, progress=False))


def random_vae(factory) -> Path:
    def build(out: Path) -> Path:
        torch.manual_seed(0)
        build_tiny_vae([32, 32], 1, 4).save_pretrained(out)
        return out

    return _once("vae", factory, build)


def tiny_unet3d(factory) -> Path:
    """A saved UNet3DConditionModel shaped like tests/tiny.py's UNet (all weights perturbed, so no layer is
    trivially zero), standing in for a ModelScope / zeroscope checkpoint."""

    def build(out: Path) -> Path:
        torch.manual_seed(0)
        unet = UNet3DConditionModel(
            block_out_channels=(32, 32), down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), layers_per_block=1, cross_attention_dim=384,
            attention_head_dim=16, norm_num_groups=32, sample_size=8,
        )
        with torch.no_grad():
            for param in unet.parameters():
                param.add_(0.02 * torch.randn_like(param))
        unet.save_pretrained(out)
        return out

    return _once("unet3d", factory, build)


def trained_run(factory, name: str, *overrides: str) -> Path:
    """Two training steps of a tiny run (plus its end-of-run validation and final save)."""

    def build(out: Path) -> Path:
        cfg = tiny_config(synth_manifest(factory), out, "train.max_steps=2", "data.num_workers=0",
                          "sample.num_inference_steps=2", *overrides, vae=random_vae(factory))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: one thread is as fast, and fair to other processes
        try:
            Trainer(cfg, build_stage(cfg)).fit()
        finally:
            torch.set_num_threads(threads)
        return out

    return _once(name, factory, build)


def built_stage(task: str, factory, tmp_path: Path, *overrides: str):
    """(stage, UNet, a batch of two clips): a text-to-video stage (a plug-in's, when the overrides name one) built
    outside the trainer on the shared tiny clips and random VAE."""
    from types import SimpleNamespace

    from data.dataset import VideoClipDataset, collate_clips
    from data.manifest import read_manifest

    manifest = synth_manifest(factory)
    cfg = tiny_config(manifest, tmp_path, f"task={task}", *overrides, vae=random_vae(factory))
    dataset = VideoClipDataset(read_manifest(manifest)[0], num_frames=4, resolution=16)
    stage = build_stage(cfg)
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no", is_main_process=False)
    model = stage.build(accelerator, dataset)
    return stage, model, collate_clips([dataset[0], dataset[1]])
