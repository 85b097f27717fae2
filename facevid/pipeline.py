"""Text -> video sampling: classifier-free guidance over a diffusers scheduler, then VAE decoding.

Used by sample.py and by validation during training, so both produce the same video for the same
weights, prompt, seed and scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.video import tensor_to_frames
from facevid.config import RunConfig, load_config, resolve_pretrained
from facevid.diffusion import build_sampler
from models.text_encoder import FrozenTextEncoder
from models.unet3d import FaceVidUNet3D
from models.vae import decode_latents, downscale_factor, load_vae


class FaceVidPipeline:
    def __init__(self, unet, vae, text_encoder: FrozenTextEncoder, scheduler_config: dict, chunk_frames: int = 16):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.chunk_frames = chunk_frames

    @classmethod
    def from_run(cls, run_dir: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
        """Load a finished (or checkpointed) run: its config, UNet (EMA weights when present), VAE, encoder."""
        run_dir = Path(run_dir)
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory: {config_file.name} is missing")
        cfg: RunConfig = load_config(config_file)
        if cfg.stage != "t2v":
            raise ValueError(f"{run_dir} trained stage '{cfg.stage}'; sampling needs a text-to-video (t2v) run")
        folder = run_dir / ("unet_ema" if use_ema and (run_dir / "unet_ema").is_dir() else "unet")
        if not folder.is_dir():
            raise FileNotFoundError(f"no trained UNet in {run_dir} (expected unet_ema/ or unet/); "
                                    "has the run finished? sample from it once training ends")
        unet = FaceVidUNet3D.from_pretrained(folder).to(device).eval()
        vae = load_vae(cfg.vae.pretrained, cfg.vae.subfolder).to(device).eval()
        encoder = FrozenTextEncoder(resolve_pretrained(cfg.text_encoder.pretrained), cfg.text_encoder.max_length,
                                    cfg.text_encoder.subfolder).to(device)
        scheduler_config = json.loads((run_dir / "scheduler" / "scheduler_config.json").read_text())
        pipe = cls(unet, vae, encoder, scheduler_config, cfg.vae.chunk_frames)
        pipe.run_config = cfg
        pipe.weights = folder.name
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        negative_prompt: str = "",
        num_frames: int = 8,
        resolution: int = 64,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        scheduler: str = "dpm++",
        seed: int = 0,
        progress: bool = False,
    ) -> np.ndarray:
        """Returns uint8 videos (N, F, H, W, 3). Prompt i's noise is seeded by seed + i, so a prompt's
        video does not depend on which other prompts share the batch."""
        factor = downscale_factor(self.vae)
        if resolution % factor:
            raise ValueError(f"resolution {resolution} must be a multiple of the VAE factor {factor}")
        device = self.device
        shape = (self.unet.config.in_channels, num_frames, resolution // factor, resolution // factor)
        latents = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))
        ]).to(device)

        text, mask = self.text_encoder(list(prompts))
        use_guidance = guidance_scale > 1.0
        if use_guidance:
            null_text, null_mask = self.text_encoder([negative_prompt] * len(prompts))
            text, mask = torch.cat([null_text, text]), torch.cat([null_mask, mask])

        sampler = build_sampler(self.scheduler_config, scheduler)
        sampler.set_timesteps(num_inference_steps, device=device)
        latents = latents * sampler.init_noise_sigma
        for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
            model_in = torch.cat([latents, latents]) if use_guidance else latents
            model_in = sampler.scale_model_input(model_in, t)
            timesteps = torch.full((model_in.shape[0],), int(t), device=device, dtype=torch.long)
            prediction = self.unet(model_in, timesteps, text.to(self.unet.dtype), mask)
            if use_guidance:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = sampler.step(prediction, t, latents).prev_sample
        video = decode_latents(self.vae, latents, self.chunk_frames)
        return np.stack([tensor_to_frames(v) for v in video.cpu()])


def slugify(text: str, max_len: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:max_len] or "prompt"


def write_samples(videos: np.ndarray, prompts: list[str], out_dir: str | Path, fps: float,
                  formats: tuple[str, ...] = ("mp4", "gif", "png")) -> list[Path]:
    """One mp4 / gif / PNG contact sheet per prompt, plus all.png with every prompt as a row."""
    from data.video import save_contact_sheet, write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        stem = out_dir / f"{i:02d}-{slugify(prompt)}"
        for ext in formats:
            path = stem.with_suffix(f".{ext}")
            if ext == "png":
                save_contact_sheet(path, [video], labels=[prompt])
            else:
                write_video(path, video, fps)
            written.append(path)
    sheet = out_dir / "all.png"
    save_contact_sheet(sheet, list(videos), labels=list(prompts))
    written.append(sheet)
    return written
