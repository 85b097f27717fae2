"""Export a trained run as a diffusers pipeline folder (unet, vae, text_encoder, tokenizer, scheduler,
model_index.json) that loads with `DiffusionPipeline.from_pretrained` elsewhere.

- A backbone expressible as diffusers' UNet3DConditionModel (built with models.pretrained.UNET3D_LAYOUT: trained
  from scratch with `unet.layout: modelscope`, or initialised from ModelScope / zeroscope; task t2v or uncond)
  becomes a standard TextToVideoSDPipeline folder: tools that consume that format use it unchanged, without
  FaceVid. That pipeline has no guidance rescale: its model card says so when the run uses one.
- Anything else (FaceVid's own layout, image-to-video) keeps the FaceVidUNet3D weights and is driven by
  FaceVidDiffusersPipeline below. The folder's pipeline.py only re-exports that class, so with the FaceVid
  checkout on PYTHONPATH `DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` loads it.

Both kinds reproduce sample.py: the scheduler is the sampler sample.py builds (DPM-Solver++ 2M or DDIM on the
run's training schedule; the FaceVid kind also keeps sample.guidance_rescale), the tokenizer keeps the run's max_length and the text encoder's config says
`use_attention_mask: true`, so diffusers' prompt encoding returns exactly the embeddings FaceVid trained with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from facevid.diffusion import build_sampler
from facevid.pipeline import FaceVidPipeline, load_first_frame, sampling_options
from models.lora import LORA_WEIGHT_NAME, lora_folder, lora_to_unet3d
from models.pretrained import to_unet3d, unet3d_incompatibilities
from models.text_encoder import FrozenTextEncoder
from models.unet3d import FaceVidUNet3D
from models.vae import downscale_factor

EXPORT_FORMATS = ("auto", "unet3d", "facevid")

_PIPELINE_SHIM = '''"""Loads this folder with DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True); needs the FaceVid
checkout on PYTHONPATH (PYTHONPATH=/path/to/FaceVid).
The pipeline code is facevid.export.FaceVidDiffusersPipeline; this file only re-exports it."""

from facevid.export import FaceVidDiffusersPipeline  # noqa: F401
'''


class _TokenizerEncoder:
    """FrozenTextEncoder's prompt encoding over an exported folder's own tokenizer and text encoder."""

    __call__ = FrozenTextEncoder.forward  # the same tokenise-and-encode code, not a copy of it
    _warn_if_truncated = FrozenTextEncoder._warn_if_truncated

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model, self.max_length = tokenizer, model, tokenizer.model_max_length
        self._warned_truncation = False

    @property
    def device(self) -> torch.device:
        return self.model.device


@dataclass
class FaceVidPipelineOutput(BaseOutput):
    frames: np.ndarray  # uint8 (N, F, H, W, 3)


class FaceVidDiffusersPipeline(DiffusionPipeline):
    """FaceVid sampling (facevid.pipeline.FaceVidPipeline) for every task, over an exported folder's components.

        pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
        pipe("a person talking", seed=0).frames                                   # t2v
        pipe("a person talking", image="face.png").frames                         # i2v
        pipe(num_videos=4).frames                                                 # uncond
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, task: str = "t2v", resolution: int = 64,
                 num_frames: int = 8, chunk_frames: int = 16, objective: dict | None = None,
                 guidance_rescale: float = 0.0):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        # objective: the run's Objective.to_dict() (facevid/objective.py), which sampling repeats.
        self.register_to_config(task=task, resolution=resolution, num_frames=num_frames, chunk_frames=chunk_frames,
                                objective=objective)
        self.register_to_config(guidance_rescale=guidance_rescale)  # the run's sample.guidance_rescale

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, num_videos: int = 1,
                 negative_prompt: str = "", num_frames: int | None = None, resolution: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 5.0, seed: int = 0,
                 guidance_rescale: float | None = None) -> FaceVidPipelineOutput:
        """`image` (i2v): a file path (image or video frame 0), or (3, H, W) / (N, 3, H, W) in [-1, 1]. Video i is
        seeded by seed + i, as in sample.py. guidance_rescale: None = the run's sample.guidance_rescale."""
        resolution = resolution or self.config.resolution
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if isinstance(image, (str, Path)):
            image = load_first_frame(image, resolution)
        if image is not None and image.ndim == 3:
            image = image[None].expand(len(prompts or [""]), -1, -1, -1)
        if image is not None and not prompts:
            prompts = [""] * len(image)  # image-to-video without a prompt: the empty prompt
        sampling = FaceVidPipeline(self.unet, self.vae, _TokenizerEncoder(self.tokenizer, self.text_encoder),
                                   self.scheduler.config, self.config.chunk_frames, task=self.config.task,
                                   objective=self.config.get("objective"),
                                   guidance_rescale=self.config.get("guidance_rescale", 0.0))
        frames = sampling(prompts, images=image, num_videos=num_videos, negative_prompt=negative_prompt,
                          num_frames=num_frames or self.config.num_frames, resolution=resolution,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          scheduler=self.scheduler, seed=seed, guidance_rescale=guidance_rescale)
        return FaceVidPipelineOutput(frames=frames)


class ExportError(ValueError):
    pass


def export_run(run_dir: str | Path, out_dir: str | Path, use_ema: bool = True, scheduler: str | None = None,
               format: str = "auto", merge_lora: bool = False) -> str:
    """Write `run_dir`'s model as a diffusers folder; returns the kind written ("unet3d" or "facevid").

    format: "unet3d" (TextToVideoSDPipeline + UNet3DConditionModel; refused, with the reasons, when the
    backbone has no such equivalent), "facevid" (FaceVidDiffusersPipeline + FaceVidUNet3D), or "auto" (unet3d
    when possible).

    A LoRA run (train.trainable=lora) exports its base UNet plus OUT/pytorch_lora_weights.safetensors (in the
    exported UNet's module names), or with merge_lora the adapters merged into the UNet's weights.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; valid: {', '.join(EXPORT_FORMATS)}")
    adapter = lora_folder(run_dir, use_ema)
    if merge_lora and adapter is None:
        raise ExportError(f"--merge-lora: {run_dir} has no LoRA adapters (lora/ or lora_ema/); it was not trained "
                          "with train.trainable=lora")
    pipe = FaceVidPipeline.from_run(run_dir, use_ema=use_ema, apply_lora=merge_lora)
    cfg = pipe.run_config
    problems = unet3d_incompatibilities(pipe.unet.config) + pipe.objective.unet3d_incompatibilities()
    if type(pipe.unet) is not FaceVidUNet3D:  # a plug-in's subclass adds layers UNet3DConditionModel lacks
        problems.append(f"its UNet is a {type(pipe.unet).__name__} (plugin.module {cfg.plugin.module})")
    if format == "unet3d" and problems:
        raise ExportError(f"{run_dir} cannot be exported as UNet3DConditionModel: " + "; ".join(problems)
                          + ". Use --format facevid (or auto).")
    scheduler = scheduler or cfg.sample.scheduler
    sampler = build_sampler(pipe.scheduler_config, scheduler)
    tokenizer, text_encoder = pipe.text_encoder.tokenizer, pipe.text_encoder.model
    tokenizer.model_max_length = cfg.text_encoder.max_length
    text_encoder.config.use_attention_mask = True
    latent_size = cfg.data.resolution // downscale_factor(pipe.vae)
    out = Path(out_dir)
    if format != "facevid" and not problems:
        from diffusers import TextToVideoSDPipeline

        exported = TextToVideoSDPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                         unet=to_unet3d(pipe.unet, sample_size=latent_size), scheduler=sampler)
        exported.save_pretrained(out)
        kind = "unet3d"
    else:
        exported = FaceVidDiffusersPipeline(
            unet=pipe.unet, vae=pipe.vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sampler,
            task=cfg.task, resolution=cfg.data.resolution, num_frames=cfg.data.num_frames,
            chunk_frames=cfg.vae.chunk_frames, objective=pipe.objective.to_dict(), **sampling_options(cfg))
        exported.save_pretrained(out)
        shim = _PIPELINE_SHIM
        if type(pipe.unet) is not FaceVidUNet3D:  # diffusers loads a component's class only from an imported module
            shim += f"import {type(pipe.unet).__module__}  # noqa: F401, E402  the UNet's class (plugin.module)\n"
        (out / "pipeline.py").write_text(shim)
        # [file, class]: DiffusionPipeline.from_pretrained finds the pipeline code in the folder's pipeline.py.
        index = json.loads((out / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", "FaceVidDiffusersPipeline"]
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        kind = "facevid"
    lora_file = None
    if adapter is not None and not merge_lora:
        if kind == "unet3d":
            lora_file = lora_to_unet3d(adapter, pipe.unet, out)
        else:
            lora_file = Path(shutil.copy(adapter / LORA_WEIGHT_NAME, out / LORA_WEIGHT_NAME))
    (out / "README.md").write_text(_model_card(kind, cfg, run_dir, pipe.weights, scheduler, lora_file))
    return kind


def _model_card(kind: str, cfg, run_dir, weights: str, scheduler: str, lora_file: Path | None = None) -> str:
    task, frames, res = cfg.task, cfg.data.num_frames, cfg.data.resolution
    if kind == "unet3d":
        prompt = '""' if task == "uncond" else '"a person talking"'
        guidance = ", guidance_scale=1.0" if task == "uncond" else f", guidance_scale={cfg.sample.guidance_scale}"
        load = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                'pipe = DiffusionPipeline.from_pretrained(".")  # TextToVideoSDPipeline\n'
                f"frames = pipe({prompt}, num_frames={frames}, height={res}, width={res}{guidance},\n"
                f"              num_inference_steps={cfg.sample.num_inference_steps}, "
                "generator=torch.Generator().manual_seed(0)).frames  # = sample.py --seed 0, one prompt per call")
        if cfg.sample.guidance_rescale:
            load += (f"\n# TextToVideoSDPipeline has no guidance rescale: these frames are sample.py's with "
                     f"--guidance-rescale 0\n# (the run samples with sample.guidance_rescale="
                     f"{cfg.sample.guidance_rescale}).")
    else:
        call = {"t2v": '"a person talking"', "i2v": '"a person talking", image="face.png"',
                "uncond": "num_videos=4"}[task]
        load = ("from diffusers import DiffusionPipeline  # needs PYTHONPATH=/path/to/FaceVid (its checkout)\n\n"
                'pipe = DiffusionPipeline.from_pretrained(".", trust_remote_code=True)  # FaceVidDiffusersPipeline\n'
                f"frames = pipe({call}, seed=0).frames  # uint8 (N, {frames}, {res}, {res}, 3)")
    card = (f"# FaceVid {task} model\n\nExported from `{run_dir}` ({weights} weights) by `export.py`: "
            f"{frames} frames at {res}x{res}, scheduler {scheduler}.\n\n```python\n{load}\n```\n")
    if lora_file is not None:
        # diffusers 0.42's pipe.load_lora_weights needs PeftAdapterMixin, which UNet3DConditionModel lacks: plain PEFT.
        card += (f"\nThe UNet above is the base model; the trained LoRA adapter is `{lora_file.name}` (diffusers' PEFT "
                 "format, `unet.`-prefixed keys, its LoraConfig in the file's metadata). Apply it before sampling:\n\n"
                 "```python\nimport json\nfrom peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict\n"
                 "from safetensors import safe_open\n\n"
                 f'with safe_open("{lora_file.name}", "pt") as f:\n'
                 '    state = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}\n'
                 '    meta = json.loads(f.metadata()["lora_adapter_metadata"])\n'
                 'config = {k.removeprefix("unet."): v for k, v in meta.items()}\n'
                 'inject_adapter_in_model(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], '
                 'target_modules=config["target_modules"]), pipe.unet)\n'
                 "set_peft_model_state_dict(pipe.unet, state)\n```\n\n"
                 "(with the FaceVid checkout on PYTHONPATH: `models.lora.load_lora(pipe.unet, \".\")`). "
                 "`export.py --merge-lora` writes the adapter merged into the UNet instead.\n")
    return card
