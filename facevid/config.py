"""Loading and saving a run configuration: the schema (facevid/schema.py) <- a YAML file (with its `base:`
chain) <- `key=value` overrides, then validated (facevid/validation.py) before any work starts.

A config file may name a `base:` file (relative to itself) whose values it overrides, so the VAE
stage of the demo is a few lines on top of the text-to-video config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from facevid.schema import OFF_CHOICES, ConfigError, RunConfig, key_value
from facevid.validation import validate

try:
    from omegaconf._yaml import get_yaml_loader  # omegaconf >= 2.4
except ImportError:
    from omegaconf._utils import get_yaml_loader  # omegaconf 2.3


class _Loader(get_yaml_loader()):
    """OmegaConf's YAML loader with YAML 1.2 booleans: only true/false are booleans. YAML 1.1 also reads
    `no`, `off`, `yes`, `on` as booleans, so `train.mixed_precision=no` arrived as 'False'. Boolean keys
    still accept yes/no/on/off (OmegaConf converts those strings)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _parse_yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None


def _load_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config 'base' chain loops back to {path}")
    content = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(content, (dict, type(None))):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(content).__name__}")
    raw = OmegaConf.create(content or {})
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _load_yaml_with_bases((path.parent / base), seen + (path.resolve(),))
    return OmegaConf.merge(parent, raw)


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), validate_files: bool = True) -> RunConfig:
    """Schema <- YAML file (with its bases) <- `key=value` overrides, then validated. validate_files=False is for
    tools that only read a recipe's settings (bench/gpu_check.py builds its UNet): types and keys are still
    checked, but nothing the config names (manifest, weights, hub ids) needs to exist."""
    schema = OmegaConf.structured(RunConfig)
    layers = [_load_yaml_with_bases(Path(path))] if path else []
    dotlist = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, value = item.split("=", 1)
        OmegaConf.update(dotlist, key, _parse_yaml(value, f"override {item!r}"))
    layers.append(dotlist)
    try:
        merged = OmegaConf.merge(schema, *layers)
        # Resolve interpolations and MISSING now so a bad config fails before any work.
        cfg: RunConfig = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise ConfigError(f"unknown config key '{err.full_key}' ({_valid_keys_hint(err.full_key)})") from None
    except ValidationError as err:
        raise ConfigError(f"config key '{err.full_key}' has a value of the wrong type: {err.msg}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': {err.msg}") from None
    for key, off in OFF_CHOICES.items():
        if str(key_value(cfg, key)).lower() in ("off", "false", "no"):
            parent, _, name = key.rpartition(".")
            setattr(key_value(cfg, parent), name, off)
    if validate_files:
        validate(cfg)
    return cfg


def _valid_keys_hint(full_key: str) -> str:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node: Any = OmegaConf.structured(RunConfig)
    for part in filter(None, parent.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig):
        return f"valid keys{' under ' + parent if parent else ''}: {', '.join(node.keys())}"
    return "see facevid/schema.py for the schema"


# Keys that may name local files or folders. A run's saved config names them by absolute path: sample.py and
# evaluate.py read it from any working directory, where a relative "runs/demo-vae/vae" would silently load
# whichever VAE sits there (or none).
LOCAL_PATH_KEYS = ("data.manifest", "data.cache_dir", "vae.pretrained", "unet.pretrained", "unet.motion_module",
                   "text_encoder.pretrained",
                   "eval.prompts_file", "eval.reference_manifest", "eval.i3d", "eval.inception", "eval.clip")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write cfg as YAML; relative paths of local files that exist are written as absolute paths."""
    conf = OmegaConf.structured(cfg)
    for key in LOCAL_PATH_KEYS:
        value = OmegaConf.select(conf, key)
        if isinstance(value, str) and not os.path.isabs(value) and Path(value).exists():
            OmegaConf.update(conf, key, str(Path(value).resolve()))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(conf, path)
