"""Stage `t2v`: trains the video denoiser (the 3D UNet or the DiT, unet.backbone) on VAE latents for the
configured task (facevid/tasks.py): conditioned on a frozen text encoder (t2v), on text and the first frame (i2v),
or on nothing (uncond)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facevid.diffusion import build_noise_scheduler, check_pretrained_schedule
from facevid.ema import ema_weights
from facevid.engine import gather_on_main, rank_share
from facevid.hub import resolve_pretrained
from facevid.objective import Objective
from facevid.pipeline import FaceVidPipeline, sampling_options, write_samples
from facevid.schema import ConfigError, RunConfig, UNetConfig
from facevid.stages.common import fixed_validation_clips, frozen_weight_dtype, training_fps
from facevid.tasks import condition_channels, first_frame_condition
from models.backbones import load_backbone
from models.dit import FaceVidDiT
from models.lora import has_lora, save_lora, without_lora
from models.pretrained import layout_options, load_pretrained_unet
from models.text_encoder import FrozenTextEncoder
from models.unet3d import FaceVidUNet3D
from models.vae import (
    decode_latents,
    downscale_factor,
    encode_video_posterior,
    load_vae,
    sample_latents,
)

logger = logging.getLogger("facevid")


def unet_arguments(u: UNetConfig, latent_channels: int, condition_channels: int, cross_attention_dim: int) -> dict:
    """FaceVidUNet3D's keyword arguments for the config's unet.* keys."""
    return dict(
        in_channels=latent_channels, out_channels=latent_channels, condition_channels=condition_channels,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        attention_levels=tuple(u.attention_levels), attention_head_dim=u.attention_head_dim,
        cross_attention_dim=cross_attention_dim, norm_num_groups=u.norm_num_groups,
        pooled_text_conditioning=u.pooled_text_conditioning,
        **layout_options(u.layout, u.attention_levels, u.temporal_conv),
        temporal_feed_forward=u.temporal_feed_forward,
    )


def build_unet(u: UNetConfig, latent_channels: int, condition_channels: int, cross_attention_dim: int) -> FaceVidUNet3D:
    """The UNet that the config's unet.* keys describe, freshly initialised (bench/gpu_check.py builds it too)."""
    return FaceVidUNet3D(**unet_arguments(u, latent_channels, condition_channels, cross_attention_dim))


def build_dit(u: UNetConfig, latent_channels: int, condition_channels: int, cross_attention_dim: int) -> FaceVidDiT:
    """The diffusion transformer that unet.dit.* describe, freshly initialised."""
    d = u.dit
    return FaceVidDiT(
        in_channels=latent_channels, out_channels=latent_channels, condition_channels=condition_channels,
        cross_attention_dim=cross_attention_dim, patch_size=d.patch_size, temporal_patch_size=d.temporal_patch_size,
        hidden_size=d.hidden_size, depth=d.depth, num_heads=d.num_heads, mlp_ratio=d.mlp_ratio,
        attention=d.attention, pooled_text_conditioning=u.pooled_text_conditioning,
    )


# unet.backbone -> builder: the one place a fresh denoiser is chosen. Loading a saved one needs no choice: its
# config.json names its class (models.backbones.load_backbone).
BACKBONES = {"unet": build_unet, "dit": build_dit}


class TextToVideoStage:
    name = "t2v"
    # validate() runs on every rank, each rendering its share of the videos (a sharded model needs every rank
    # in every forward); the Trainer calls the VAE stage's on rank 0 alone, with a full model.
    distributed_validation = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def build(self, accelerator, dataset) -> nn.Module:
        cfg = self.cfg
        self.device = accelerator.device
        self.accelerator = accelerator
        weight_dtype = frozen_weight_dtype(accelerator.mixed_precision)
        # Frozen, so never in fp32 under mixed precision: a T5-XXL encoder alone is ~19 GB per rank in fp32.
        self.text_encoder = FrozenTextEncoder(
            resolve_pretrained(cfg.text_encoder.pretrained), cfg.text_encoder.max_length, cfg.text_encoder.subfolder
        ).to(self.device, weight_dtype)
        self.vae = load_vae(cfg.vae.pretrained, cfg.vae.subfolder).to(self.device, weight_dtype).requires_grad_(False)
        self.vae.eval()
        self.noise_scheduler = build_noise_scheduler(cfg.diffusion)
        self.objective = self.build_objective()
        if cfg.task == "i2v" and self.objective.parameterization.transforms_latents:
            raise ConfigError(f"task i2v needs plain latents (its condition is the first frame as encoded), but "
                              f"the objective's {self.objective.parameterization.to_dict()['type']} transforms them")
        if accelerator.is_main_process:  # what sample.py, evaluate.py and export.py read back
            self.noise_scheduler.save_pretrained(Path(cfg.output_dir) / "scheduler")
            self.objective.save(Path(cfg.output_dir) / "objective.json")

        u = cfg.unet
        latent_channels = self.vae.config.latent_channels
        extra_channels = condition_channels(cfg.task, latent_channels)
        if u.pretrained and u.backbone == "dit":  # a FaceVidDiT folder (a DiT run's unet/ or unet_ema/)
            unet = load_backbone(Path(u.pretrained) / (u.subfolder or ""))
            if not isinstance(unet, FaceVidDiT):
                raise ConfigError(f"config key 'unet.pretrained' = {u.pretrained!r} is invalid with unet.backbone=dit: "
                                  f"it holds a {type(unet).__name__}; give a FaceVidDiT folder or unet.backbone=unet")
            if unet.config.condition_channels != extra_channels:
                raise ConfigError(f"config key 'unet.pretrained' = {u.pretrained!r} is invalid: that DiT takes "
                                  f"{unet.config.condition_channels} condition channels, task {cfg.task} needs "
                                  f"{extra_channels}")
            self._check_pretrained(unet, latent_channels)
        elif u.pretrained:
            unet = load_pretrained_unet(u.pretrained, u.pretrained_format, u.subfolder, extra_channels,
                                        u.motion_module, u.motion_module_norm)
            self._check_pretrained(unet, latent_channels)
        else:
            width = self.text_encoder.hidden_size
            if u.backbone == "unet":  # through the stage's hook: a plug-in may build a FaceVidUNet3D subclass
                unet = self.new_unet(**unet_arguments(u, latent_channels, extra_channels, width))
            else:
                unet = BACKBONES[u.backbone](u, latent_channels, extra_channels, width)
        factor = downscale_factor(self.vae) * unet.spatial_factor
        if cfg.data.resolution % factor:
            raise ConfigError(f"config key 'data.resolution' = {cfg.data.resolution} is invalid: must be a "
                              f"multiple of {factor} for this VAE and {type(unet).__name__}")
        unet.set_attention_backend(u.attention_backend)
        if u.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # Caption dropout swaps in the empty prompt's embedding: what guidance uses at sampling time.
        # Training from the cache uses the cache's stored copy, so both paths see the same values.
        cache = getattr(dataset, "cache", None)
        if cache is not None:
            self.null_text, self.null_mask = (t[None].to(self.device) for t in cache.text(dataset.text_key("")))
        else:
            self.null_text, self.null_mask = self.text_encoder([""])
        self.validation_prompts = list(cfg.train.validation_prompts) or [
            dataset.records[i].captions[0] for i in range(min(4, len(dataset)))]
        if cfg.task == "i2v":
            # Image-to-video validates on real first frames, with their own clips' captions.
            self.validation_clips = fixed_validation_clips(dataset, 4)
        return unet

    # Extension points: a plug-in's stage (plugin.module's STAGES, e.g. demo/aids.py) overrides these.
    def build_objective(self) -> Objective:
        """The training objective (facevid/objective.py), saved with the run for sampling and export."""
        return Objective.from_config(self.cfg.diffusion, self.noise_scheduler)

    def new_unet(self, **kwargs) -> FaceVidUNet3D:
        """A new UNet from the core's keyword arguments (unet_arguments: unet.* and the data's channels)."""
        return FaceVidUNet3D(**kwargs)

    def _check_pretrained(self, unet: FaceVidUNet3D, latent_channels: int) -> None:
        u, text_width = self.cfg.unet, self.text_encoder.hidden_size
        if unet.config.in_channels != latent_channels:
            raise ConfigError(f"config key 'unet.pretrained' = {u.pretrained!r} is invalid: the UNet takes "
                              f"{unet.config.in_channels} latent channels, the VAE makes {latent_channels}")
        if unet.config.cross_attention_dim != text_width:
            raise ConfigError(f"config key 'unet.pretrained' = {u.pretrained!r} is invalid: its cross-attention "
                              f"expects {unet.config.cross_attention_dim}-wide text states, the text encoder "
                              f"{self.cfg.text_encoder.pretrained!r} makes {text_width}-wide ones; use the text "
                              "encoder the UNet was trained with")
        if u.pooled_text_conditioning and not unet.config.get("pooled_text_conditioning"):
            raise ConfigError(f"config key 'unet.pooled_text_conditioning' = True is invalid with unet.pretrained = "
                              f"{u.pretrained!r}: that UNet has no pooled-text layers (its config fixes the "
                              "architecture); set unet.pooled_text_conditioning=false")
        check_pretrained_schedule(u.pretrained, u.subfolder, self.cfg.diffusion)
        logger.info("UNet initialised from %s (architecture from its config; unet.block_out_channels etc. unused)",
                    u.pretrained)

    def encode_batch(self, batch) -> tuple[torch.Tensor, ...]:
        """(posterior mean, std, text embeddings, mask): read from the cache when the batch carries
        them (data.cache), else encoded now with the frozen VAE and text encoder."""
        if "latent_mean" in batch:
            return tuple(batch[k].to(self.device, non_blocking=True)  # async from pinned memory
                         for k in ("latent_mean", "latent_std", "text_embeds", "text_mask"))
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        mean, std = encode_video_posterior(self.vae, pixels, self.cfg.vae.chunk_frames)
        if self.cfg.task == "uncond":  # captions are never used: skip encoding them
            return mean, std, self.null_text.expand(len(mean), -1, -1), self.null_mask.expand(len(mean), -1)
        return (mean, std, *self.text_encoder(list(batch["caption"])))

    def compute_loss(self, model, batch, generator):
        cfg = self.cfg
        mean, std, text, mask = self.encode_batch(batch)
        scale = self.vae.config.scaling_factor
        latents = sample_latents(mean, std, scale, generator) if cfg.vae.sample_posterior else mean * scale
        if cfg.task == "uncond":  # always the empty prompt, also when the cache holds the captions
            text, mask = self.null_text.expand_as(text), self.null_mask.expand_as(mask)
        else:
            drop = torch.rand(len(text), generator=generator, device=generator.device) < cfg.data.caption_dropout
            drop = drop.to(text.device)
            text = torch.where(drop[:, None, None], self.null_text.expand_as(text), text)
            mask = torch.where(drop[:, None], self.null_mask.expand_as(mask), mask)
        # i2v: the first frame of the very latents being denoised, so cached and uncached training match.
        condition = first_frame_condition(latents[:, :, :1], latents.shape[2]) if cfg.task == "i2v" else None
        # Joint image + video training: an image batch (one frame per item) trains the spatial layers only.
        image = bool(batch.get("image_batch", False))
        spatial_only = {"temporal": False} if image else {}
        loss = self.objective.loss(lambda noisy, t: model(noisy, t, text, mask, condition=condition, **spatial_only),
                                   latents, generator)
        return loss, ({"image_batch": float(image)} if cfg.data.image_batch_share else {})

    def pipeline(self, unet) -> FaceVidPipeline:
        return FaceVidPipeline(unet, self.vae, self.text_encoder, self.noise_scheduler.config,
                               self.cfg.vae.chunk_frames, task=self.cfg.task, objective=self.objective,
                               **sampling_options(self.cfg))

    def _validation_inputs(self) -> tuple[list[str], torch.Tensor | None, list[str]]:
        """(prompts, first frames, labels) for the task."""
        task = self.cfg.task
        if task == "uncond":
            return [], None, [f"unconditional {i}" for i in range(len(self.validation_prompts))]
        if task == "t2v":
            return self.validation_prompts, None, self.validation_prompts
        clips = self.validation_clips
        if "pixel_values" in clips[0]:
            images = torch.stack([c["pixel_values"][:, 0] for c in clips])
        else:  # cached clips hold latents: decode their first frames
            first = torch.stack([c["latent_mean"][:, :1] for c in clips]).to(self.device)
            images = decode_latents(self.vae, first * self.vae.config.scaling_factor)[:, :, 0]
        prompts = [c["caption"] for c in clips]
        return prompts, images, prompts

    def validate(self, model, out_dir: Path, step: int):
        s, d = self.cfg.sample, self.cfg.data
        prompts, images, labels = self._validation_inputs()
        mine, real = rank_share(len(labels), self.accelerator)
        videos = self.pipeline(model)(
            [prompts[i] for i in mine] if prompts else [], images=None if images is None else images[mine],
            num_videos=len(mine), negative_prompt=s.negative_prompt,
            num_frames=d.num_frames, resolution=d.resolution, num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale, scheduler=s.scheduler,
            seed=[s.seed + i for i in mine],  # video i's noise as if all were rendered in one batch
        )
        videos = gather_on_main(list(videos), mine, real, len(labels), self.accelerator)
        if videos is None:  # not the main process: its videos were sent there
            return {}, {}
        paths = write_samples(np.stack(videos), labels, out_dir, fps=training_fps(self.cfg), formats=("mp4",))
        return {"samples": paths}, {}

    def save_final(self, model, ema, run_dir: Path) -> None:
        """unet/ (+ unet_ema/); a LoRA run (train.trainable=lora) instead writes its frozen base UNet to unet/ and
        the adapters to lora/ (+ lora_ema/) as pytorch_lora_weights.safetensors (models/lora.py)."""
        lora = has_lora(model)
        with without_lora(model):
            model.save_pretrained(run_dir / "unet")
        if lora:
            save_lora(model, run_dir / "lora")
        if ema is not None:
            with ema_weights(ema, model):
                if lora:
                    save_lora(model, run_dir / "lora_ema")
                else:
                    model.save_pretrained(run_dir / "unet_ema")
        saved = ("lora" if lora else "unet") + ("_ema" if ema is not None else "")
        logger.info("UNet saved to %s%s", run_dir / saved, " (base weights in unet/)" if lora else "")
