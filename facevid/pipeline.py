"""Sampling for every task: classifier-free guidance over a diffusers scheduler, then VAE decoding.

Used by sample.py, by validation during training and by exported FaceVid pipelines (facevid/export.py), so all
produce the same video for the same weights, inputs, seed and scheduler.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from data.video import center_crop_resize, frames_to_tensor, read_frames, tensor_to_frames
from facevid.config import load_config
from facevid.diffusion import build_sampler
from facevid.hub import resolve_pretrained
from facevid.objective import Objective
from facevid.schema import RunConfig
from facevid.tasks import check_request, condition_channels, first_frame_condition
from facevid.validation import import_plugin
from models.backbones import BACKBONE_CLASSES, load_backbone
from models.lora import load_lora, lora_folder, merge_lora
from models.text_encoder import FrozenTextEncoder
from models.vae import decode_latents, downscale_factor, encode_video_posterior, load_vae

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif"}


def load_first_frame(path: str | Path, resolution: int, frame: int | None = None) -> torch.Tensor:
    """An image file, or frame `frame` of a video, as the dataset prepares frames: center square crop resized
    to `resolution`, (3, H, W) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames = read_frames(path, [frame or 0], resolution)
    else:
        if frame is not None:
            raise ValueError(f"--image-frame needs a video, but {path.name} is a still image")
        frames = center_crop_resize(np.array(Image.open(path).convert("RGB"))[None], resolution)
    return frames_to_tensor(frames)[:, 0]


def load_unet(folder: Path, cfg: RunConfig):
    """A trained backbone folder: FaceVidUNet3D, FaceVidDiT, or the subclass a plug-in (plugin.module) defines, by
    the class name config.json records."""
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "FaceVidUNet3D")
    if class_name in BACKBONE_CLASSES:
        return load_backbone(folder)
    unet_class = getattr(import_plugin(cfg), class_name, None)
    if unet_class is None:
        raise ValueError(f"{folder} holds a {class_name}, which neither FaceVid nor the run's plugin.module "
                         f"({cfg.plugin.module}) defines")
    return unet_class.from_pretrained(folder)


def sampling_options(cfg: RunConfig) -> dict:
    """The run's sampling settings that a FaceVidPipeline keeps as its defaults (what training chose is in the
    objective, passed on its own)."""
    return {"guidance_rescale": cfg.sample.guidance_rescale}


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Classifier-free guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", section 3.4): the guided prediction scaled to the conditional prediction's std (per video, over all
    its elements), mixed with the plain guided one by `rescale` (phi). Strong guidance inflates the prediction's
    std, which with zero-terminal SNR over-exposes the video; phi = 0.7 at guidance 7.5 is the paper's choice.
    rescale = 0 returns `guided` unchanged."""
    if rescale == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def _checked_rescale(guidance_rescale: float) -> float:
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1] (0 = off, e.g. 0.7)")
    return guidance_rescale


class FaceVidPipeline:
    def __init__(self, unet, vae, text_encoder: FrozenTextEncoder, scheduler_config: dict, chunk_frames: int = 16,
                 task: str | None = None, objective: Objective | dict | None = None, guidance_rescale: float = 0.0):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.chunk_frames = chunk_frames
        # The training objective (or its to_dict()): its noise prior, parameterisation and latent space are
        # what sampling must repeat. None = independent noise and a plain prediction.
        self.objective = objective if isinstance(objective, Objective) else Objective.from_dict(objective)
        self.guidance_rescale = _checked_rescale(guidance_rescale)  # the default of __call__'s guidance_rescale (sample.guidance_rescale)
        # A conditioned UNet can only be an image-to-video one; uncond must be said (its UNet looks like t2v).
        self.task = task or ("i2v" if unet.config.condition_channels else "t2v")
        if self.task == "i2v" and self.objective.parameterization.transforms_latents:
            raise ValueError(f"{self.objective.parameterization.to_dict()['type']}: image-to-video sampling needs "
                             "plain latents (it writes the given first frame into the latents being sampled)")
        expected = condition_channels(self.task, unet.config.in_channels)
        if unet.config.condition_channels != expected:
            raise ValueError(f"task {self.task} needs a UNet with condition_channels={expected}, this one has "
                             f"{unet.config.condition_channels}")

    @classmethod
    def from_run(cls, run_dir: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                 apply_lora: bool = True):
        """Load a finished (or checkpointed) run: its config, UNet (EMA weights when present), VAE, encoder.
        A LoRA run's adapters (lora_ema/ or lora/) are merged into its base UNet unless apply_lora is False."""
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
        unet = load_unet(folder, cfg).to(device).eval()
        weights = folder.name
        adapter = lora_folder(run_dir, use_ema)
        if adapter is not None and apply_lora:
            load_lora(unet, adapter)
            merge_lora(unet)
            weights = f"{folder.name} + {adapter.name}"
        vae = load_vae(cfg.vae.pretrained, cfg.vae.subfolder).to(device).eval()
        encoder = FrozenTextEncoder(resolve_pretrained(cfg.text_encoder.pretrained), cfg.text_encoder.max_length,
                                    cfg.text_encoder.subfolder).to(device)
        scheduler_config = json.loads((run_dir / "scheduler" / "scheduler_config.json").read_text())
        objective_file = run_dir / "objective.json"  # written by training; older runs: from the config
        objective = Objective.load(objective_file) if objective_file.is_file() else Objective.from_config(cfg.diffusion)
        pipe = cls(unet, vae, encoder, scheduler_config, cfg.vae.chunk_frames, task=cfg.task, objective=objective,
                   **sampling_options(cfg))
        pipe.run_config = cfg
        pipe.weights = weights
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_first_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled posterior-mean latents (N, C, 1, h, w): the path training encodes
        clips with, without the posterior noise."""
        mean, _ = encode_video_posterior(self.vae, images[:, :, None].to(self.device), self.chunk_frames)
        return mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | None = None,
        images: torch.Tensor | None = None,
        num_videos: int = 1,
        negative_prompt: str = "",
        num_frames: int = 8,
        resolution: int = 64,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        scheduler="dpm++",
        seed: int | Sequence[int] = 0,
        progress: bool = False,
        guidance_rescale: float | None = None,
    ) -> np.ndarray:
        """Returns uint8 videos (N, F, H, W, 3).

        t2v: one video per prompt. i2v: one per (prompt, image) pair, images (N, 3, H, W) in [-1, 1] at
        `resolution` (a prompt may be ""); frame 0 is the image after a VAE round trip. uncond: `num_videos`
        videos, no prompts. `scheduler` is "dpm++", "ddim" or a ready diffusers scheduler. Video i's noise is
        seeded by seed + i, so a video does not depend on which others share the batch; a list of seeds gives
        each video its own (the same seed for two prompts that differ in one word shows that word's effect).
        `guidance_rescale` (see rescale_guidance; None = the pipeline's, i.e. the run's sample.guidance_rescale).
        """
        guidance_rescale = self.guidance_rescale if guidance_rescale is None else _checked_rescale(guidance_rescale)
        check_request(self.task, bool(prompts), images is not None)
        factor = downscale_factor(self.vae)
        if resolution % factor:
            raise ValueError(f"resolution {resolution} must be a multiple of the VAE factor {factor}")
        if self.task == "uncond":
            prompts = [""] * num_videos
        elif not prompts:  # an image alone: the empty prompt (what caption dropout trained)
            prompts = [""] * len(images)
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"give one image per prompt: {len(images)} image(s), {len(prompts)} prompt(s)")
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"give one seed per video: {len(seeds)} seed(s) for {len(prompts)} video(s)")
        device = self.device
        shape = (self.unet.config.in_channels, num_frames, resolution // factor, resolution // factor)
        latents = torch.stack([
            self.objective.initial_noise(shape, torch.Generator().manual_seed(s)) for s in seeds
        ]).to(device)

        text, mask = self.text_encoder(prompts)
        # Guidance needs two different text conditions; an unconditional model only ever sees one.
        use_guidance = guidance_scale > 1.0 and self.task != "uncond"
        if use_guidance:
            null_text, null_mask = self.text_encoder([negative_prompt] * len(prompts))
            text, mask = torch.cat([null_text, text]), torch.cat([null_mask, mask])

        condition = first = None
        if images is not None:
            first = self.encode_first_frames(images)
            condition = first_frame_condition(first, num_frames).to(self.unet.dtype)
            condition = torch.cat([condition, condition]) if use_guidance else condition
            # Frame 0 is the given latent noised to each step's level with this fixed noise ("inpainting"),
            # which is the input training showed the model for frame 0.
            frame0_noise = latents[:, :, :1].clone()

        sampler = scheduler if not isinstance(scheduler, str) else build_sampler(self.scheduler_config, scheduler)
        sampler.set_timesteps(num_inference_steps, device=device)
        latents = latents * sampler.init_noise_sigma
        alphas_cumprod = sampler.alphas_cumprod.to(device)
        for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
            if first is not None:
                alpha = alphas_cumprod[int(t)]
                latents[:, :, :1] = alpha.sqrt() * first + (1 - alpha).sqrt() * frame0_noise
            model_in = torch.cat([latents, latents]) if use_guidance else latents
            model_in = sampler.scale_model_input(model_in, t)
            timesteps = torch.full((model_in.shape[0],), int(t), device=device, dtype=torch.long)
            prediction = self.unet(model_in, timesteps, text.to(self.unet.dtype), mask, condition=condition)
            if use_guidance:
                uncond, cond = prediction.chunk(2)
                prediction = rescale_guidance(uncond + guidance_scale * (cond - uncond), cond, guidance_rescale)
            prediction = self.objective.prediction(prediction, latents, alphas_cumprod[int(t)])
            latents = sampler.step(prediction, t, latents).prev_sample
        if first is not None:
            latents[:, :, :1] = first
        latents = self.objective.to_data_space(latents)
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
