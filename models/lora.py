"""LoRA adapters on a FaceVidUNet3D through PEFT, saved in diffusers' LoRA format.

- `add_lora(unet, rank, alpha, dropout, patterns)`: PEFT LoRA layers on the Linear / Conv modules whose names
  match the fnmatch `patterns` (e.g. "*.to_q"); every base weight is frozen, only the adapters train.
- `save_lora(unet, folder)`: `pytorch_lora_weights.safetensors`, written by diffusers' own LoRA saver: peft's
  adapter state dict (get_peft_model_state_dict) with diffusers' `unet.` prefix (`unet.<module>.lora_A.weight`),
  and the LoraConfig as the safetensors metadata diffusers' loaders read.
- `load_lora(model, folder)`: that adapter onto any torch module with those module names (a FaceVidUNet3D, or the
  UNet3DConditionModel of an exported run after `lora_to_unet3d`), with plain PEFT: inject_adapter_in_model +
  set_peft_model_state_dict. (diffusers 0.42's `load_lora_weights` needs PeftAdapterMixin, which its
  UNet3DConditionModel lacks.)
- `merge_lora(model)`: the adapters folded into the base weights (W + alpha/rank * B A), the PEFT layers removed.
- `without_lora(model)`: the adapters temporarily taken out, e.g. to save the frozen base weights.
- `lora_to_unet3d(folder, unet, out)`: the file rewritten with UNet3DConditionModel's module names
  (models/pretrained.py key_map), for a run exported as a standard TextToVideoSDPipeline.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' LoRA loaders read the adapter's LoraConfig from this safetensors metadata entry.
_METADATA_KEY = "lora_adapter_metadata"
_PREFIX = "unet"
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d)  # module types PEFT's LoRA wraps
# peft is imported inside the functions that use it: sampling a run without adapters never needs it.
# The LoraConfig fields this module sets; the rest of the saved config is PEFT's defaults.
_LORA_CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "fan_in_fan_out",
                     "init_lora_weights", "rank_pattern", "alpha_pattern", "use_dora")


class LoRAPatternError(ValueError):
    """A target pattern matches no adaptable module."""


def lora_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the Linear / Conv modules matching any of `patterns`; each pattern must match at least one."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    targets: list[str] = []
    for pattern in patterns:
        names = [name for name, m in modules if fnmatchcase(name, pattern)]
        found = [name for name, m in modules if isinstance(m, ADAPTABLE) and fnmatchcase(name, pattern)]
        if not found:
            what = (f"it matches only {names[:3]} (not Linear / Conv layers)" if names
                    else f"e.g. module names: {[n for n, m in modules if isinstance(m, ADAPTABLE)][:4]}")
            raise LoRAPatternError(f"LoRA target pattern {pattern!r} matches no Linear or Conv layer; {what}")
        targets += [name for name in found if name not in targets]
    return targets


def add_lora(unet: nn.Module, rank: int, alpha: float, dropout: float, patterns: list[str]) -> list[str]:
    """Adds a PEFT LoRA adapter ("default") on the modules `patterns` name; returns their names."""
    from peft import LoraConfig

    targets = lora_targets(unet, patterns)
    # Exact module names, not the patterns: the saved config then says precisely which layers carry adapters.
    _inject(unet, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return targets


def _inject(model: nn.Module, config) -> None:
    from peft import inject_adapter_in_model

    if has_lora(model):
        raise ValueError("the model already carries a LoRA adapter")
    inject_adapter_in_model(config, model, adapter_name="default")


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' PEFT format: `unet.<module>.lora_A.weight` / `.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    return {f"{_PREFIX}.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def _save(folder: Path, state: dict, config: dict) -> Path:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unprefixed = {k[len(_PREFIX) + 1:]: v for k, v in state.items()}
    # The exact adapted modules (PEFT may have shortened its list to name suffixes, which need not mean the same
    # modules in another model, e.g. `to_out` is a ModuleList in diffusers' UNets).
    config = {**config, "target_modules": sorted({k.partition(".lora_")[0] for k in unprefixed})}
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=unprefixed,
                                                     unet_lora_adapter_metadata=config, weight_name=LORA_WEIGHT_NAME)
    return Path(folder) / LORA_WEIGHT_NAME


def save_lora(unet, folder: str | Path) -> Path:
    """Writes folder/pytorch_lora_weights.safetensors (adapter weights + their LoraConfig); returns the file."""
    return _save(Path(folder), lora_state_dict(unet), unet.peft_config["default"].to_dict())


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with `unet.` keys, LoraConfig kwargs) of a LoRA file or of the folder holding one."""
    from safetensors import safe_open

    path = Path(path)
    path = path / LORA_WEIGHT_NAME if path.is_dir() else path
    with safe_open(str(path), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        packed = json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}"))
    config = {k[len(_PREFIX) + 1:]: v for k, v in packed.items() if k.startswith(_PREFIX + ".")}
    return state, config


def load_lora(model: nn.Module, folder: str | Path) -> None:
    """Adds the adapter saved by `save_lora` (or `lora_to_unet3d`) to `model`, which has no adapter yet: the
    result computes what the trained model did. Every adapter weight must find its layer."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    state, config = read_lora(folder)
    if not config:
        raise ValueError(f"{folder}: no LoraConfig in the file's metadata (not written by facevid's save_lora)")
    _inject(model, LoraConfig(**{k: v for k, v in config.items() if k in _LORA_CONFIG_KEYS}))
    result = set_peft_model_state_dict(model, {k[len(_PREFIX) + 1:]: v for k, v in state.items()})
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{folder}: adapter weights do not fit the model: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}")


def merge_lora(model: nn.Module) -> None:
    """Folds the adapters into the base weights and removes the PEFT layers: a plain model again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config


@contextmanager
def without_lora(unet: nn.Module):
    """The model with its LoRA layers swapped for their base layers for the duration (weights untouched)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    swapped = []
    for name, module in wrapped:
        parent = unet.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], module.get_base_layer())
        swapped.append((parent, name.rpartition(".")[2], module))
    try:
        yield unet
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def lora_folder(run_dir: str | Path, use_ema: bool = True) -> Path | None:
    """A LoRA run's adapter folder (facevid/stages/text_to_video.py writes lora/ and, with EMA, lora_ema/); None otherwise."""
    for name in ("lora_ema", "lora") if use_ema else ("lora",):
        if (Path(run_dir) / name / LORA_WEIGHT_NAME).is_file():
            return Path(run_dir) / name
    return None


def lora_to_unet3d(folder: str | Path, unet, out: str | Path) -> Path:
    """Rewrites a FaceVid LoRA file (module names of `unet`, a FaceVidUNet3D exportable as UNet3DConditionModel)
    with UNet3DConditionModel's module names into out/pytorch_lora_weights.safetensors."""
    from models.pretrained import key_map

    weights = key_map(unet, temporal=True)  # "<module>.weight" -> "<diffusers module>.weight"
    modules = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in weights.items() if k.endswith(".weight")}
    state, config = read_lora(folder)
    renamed = {}
    for key, value in state.items():
        module, _, rest = key[len(_PREFIX) + 1:].partition(".lora_")
        renamed[f"{_PREFIX}.{modules[module]}.lora_{rest}"] = value
    return _save(Path(out), renamed, config)
