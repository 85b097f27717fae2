"""What is trained: `train.trainable`, `train.trainable_include` / `train.trainable_exclude`, and LoRA.

Modes (train.trainable):
- all: every parameter of the stage's model.
- temporal: only the temporal layers (temporal attention / transformers, temporal convs, the input temporal
  transformer: models.pretrained.TEMPORAL_MODULES, the layers an image UNet lacks). On a UNet inflated from an
  image UNet (unet.pretrained_format=unet2d) this is AnimateDiff's recipe: the image weights stay as they are.
- patterns: only what train.trainable_include names.
- lora: LoRA adapters (models/lora.py) on the modules lora.target_modules names; every base weight is frozen.

trainable_include adds parameters to the mode's selection and trainable_exclude removes them (exclude wins).
Patterns are shell-style (fnmatch, case-sensitive) over full parameter names as `model.named_parameters()` gives
them, e.g. "*.temporal.*", "conv_in.*", "*.norm*.weight"; `*` also matches dots. A pattern that matches no
parameter is a ConfigError naming it, so a typo never silently trains (or freezes) nothing.

Only the trainable parameters go to the optimizer and the EMA; `facevid.ema.trainable_parameters(model)` is the one
list both (and EMA's store / copy_to) use.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase

from torch import nn

from facevid.schema import ConfigError, RunConfig
from models.pretrained import TEMPORAL_MODULES

logger = logging.getLogger("facevid")


def is_temporal(name: str) -> bool:
    return any(part in "." + name for part in TEMPORAL_MODULES)


def _matching(names: list[str], patterns: list[str], key: str) -> set[str]:
    selected: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(f"config key '{key}': pattern {pattern!r} matches no parameter of the model "
                              f"(fnmatch over names such as {names[:3]}; e.g. '*.temporal.*', 'conv_in.*')")
        selected |= hits
    return selected


def select_trainable(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Applies cfg.train.trainable to `model` in place (adding the LoRA adapters for mode lora): sets
    requires_grad, logs the trainable and frozen counts, and returns the trainable parameters' names."""
    t = cfg.train
    if t.trainable == "lora":
        from models.lora import LoRAPatternError, add_lora

        try:
            add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.target_modules))
        except LoRAPatternError as err:
            raise ConfigError(f"config key 'lora.target_modules': {err}") from None
    names = [name for name, _ in model.named_parameters()]
    if t.trainable == "lora":
        selected = {n for n in names if ".lora_" in n}
    elif t.trainable == "temporal":
        selected = {n for n in names if is_temporal(n)}
        if not selected:
            raise ConfigError("config key 'train.trainable' = 'temporal' is invalid: the model has no temporal "
                              f"layers (no parameter name contains {' / '.join(TEMPORAL_MODULES)})")
    elif t.trainable == "patterns":
        selected = set()
    else:
        selected = set(names)
    selected |= _matching(names, list(t.trainable_include), "train.trainable_include")
    selected -= _matching(names, list(t.trainable_exclude), "train.trainable_exclude")
    if not selected:
        raise ConfigError(f"train.trainable={t.trainable!r} with trainable_include={list(t.trainable_include)} and "
                          f"trainable_exclude={list(t.trainable_exclude)} leaves no parameter to train")
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
    if cfg.task == "i2v" and not any(n.startswith("conv_in.") for n in selected):
        # with_condition_channels (models/pretrained.py) adds the first-frame channels to conv_in at zero.
        logger.warning("task i2v with conv_in frozen: its first-frame condition channels start at zero and stay "
                       "there, so the model cannot learn to use the image; add 'conv_in.*' to "
                       "train.trainable_include (or 'conv_in' to lora.target_modules)")
    counts = {True: 0, False: 0}
    for name, param in model.named_parameters():
        counts[name in selected] += param.numel()
    total = counts[True] + counts[False]
    logger.info("trainable parameters (train.trainable=%s): %.2fM of %.2fM (%.2f%%) in %d tensors; frozen %.2fM",
                t.trainable, counts[True] / 1e6, total / 1e6, 100 * counts[True] / total, len(selected),
                counts[False] / 1e6)
    return [n for n in names if n in selected]
