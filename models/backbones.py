"""Loading a saved FaceVid denoiser (a run's unet/ or unet_ema/ folder) as the class its config.json names.

Which backbone a new run builds is chosen in one place, facevid.stages.BACKBONES (config key unet.backbone);
a saved model needs no choice: diffusers writes the class name into config.json (`_class_name`).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers.models.modeling_utils import ModelMixin

from models.dit import FaceVidDiT
from models.unet3d import FaceVidUNet3D

BACKBONE_CLASSES = {cls.__name__: cls for cls in (FaceVidUNet3D, FaceVidDiT)}


def load_backbone(folder: str | Path) -> ModelMixin:
    """The FaceVidUNet3D or FaceVidDiT saved (save_pretrained) in `folder`."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} holds no saved model: {config_file.name} is missing")
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in BACKBONE_CLASSES:
        raise ValueError(f"{config_file} names model class {name!r}; FaceVid backbones are "
                         f"{', '.join(BACKBONE_CLASSES)}")
    return BACKBONE_CLASSES[name].from_pretrained(folder)
