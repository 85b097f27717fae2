"""What each training stage builds and how it computes its loss; the Trainer (facevid/trainer.py) does the rest.

- `VAEStage` (vae.py) trains a small AutoencoderKL on the dataset's frames.
- `TextToVideoStage` (text_to_video.py) trains the video denoiser on VAE latents, for any task.
"""

from __future__ import annotations

from facevid.schema import RunConfig
from facevid.stages.text_to_video import TextToVideoStage
from facevid.stages.vae import VAEStage
from facevid.validation import import_plugin

STAGES = {"vae": VAEStage, "t2v": TextToVideoStage}


def build_stage(cfg: RunConfig):
    """The stage cfg.stage names: the core's, or the plug-in's own (plugin.module's STAGES) when it has one."""
    stages = {**STAGES, **getattr(import_plugin(cfg), "STAGES", {})}
    return stages[cfg.stage](cfg)
