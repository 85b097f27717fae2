"""AnimateDiff motion modules as the temporal layers of a FaceVidUNet3D built from a Stable Diffusion UNet.

AnimateDiff adds a motion module after every ResNet (+ spatial attention) of every down and up block, and in v2 /
v3 also after the mid block's attention: exactly FaceVid's UNetLayer temporal slot. With
`temporal_block="animatediff"` (models/unet3d.py) each slot computes what a motion module computes, so

    model = from_unet2d_and_motion(unet2d, load_motion_module(path))

is the AnimateDiff video model: tests/test_animatediff.py shows it gives diffusers' UNetMotionModel outputs.
`to_motion_adapter(model)` goes back: fine-tuned motion modules as a MotionAdapter (or, through
`diffusers_to_original`, an original-format checkpoint) for AnimateDiff tooling.

Two weight formats are read, both into one canonical form (diffusers' MotionAdapter keys, positions dropped):
- a diffusers MotionAdapter folder (config.json + diffusion_pytorch_model.safetensors / .bin), or a single file
  holding such a state dict;
- the original checkpoints (`mm_sd_v15*.ckpt`, `v3_sd15_mm.ckpt`, safetensors conversions), keyed
  `down_blocks.i.motion_modules.j.temporal_transformer....`, sometimes wrapped in {"state_dict": ...}.
Pickled files are opened with torch.load(weights_only=True), which refuses to build anything but tensors and
plain containers, so a model file can never run code; anything that is not a tensor is refused too.

The stored sinusoidal position tables (`pos_encoder.pe`, diffusers' `pos_embed.pe`) are checked against the
formula and dropped: FaceVid regenerates them for any clip length. Their length (24 in v1, 32 in v2 / v3) is the
longest clip the module was trained on; longer clips work but are outside its training.

GroupNorm: the original code normalises each frame on its own; diffusers' AnimateDiffTransformer3D (0.42) pools
the statistics over all frames of a video. norm="frame" (default) reproduces the original, which the published
modules were trained with; norm="video" reproduces diffusers' AnimateDiffPipeline.

A v1 module has no mid-block motion module; FaceVid's mid layer keeps its temporal block, which starts as the
identity (zero proj_out), so the model still computes what AnimateDiff v1 computes.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from models.pretrained import (
    _TEMPORAL,
    UnsupportedBackboneError,
    _load_mapped,
    _rename,
    facevid_config_from_unet2d,
    key_map,
)
from models.unet3d import ANIMATEDIFF_HEADS, TEMPORAL_NORMS, FaceVidUNet3D, interleaved_sinusoids

logger = logging.getLogger("facevid")

# The FaceVidUNet3D options that make every temporal slot an AnimateDiff motion module.
ANIMATEDIFF_LAYOUT = {
    "ff_activation": "geglu",
    "temporal_conv": False,
    "temporal_block": "animatediff",
    "input_temporal_transformer": False,
    "temporal_position_encoding": "sinusoidal",
    "cross_attention_mask": False,
}

# Original key part -> diffusers MotionAdapter key part, inside `transformer_blocks.0.`.
_ORIGINAL_RENAMES = {
    "attention_blocks.0": "attn1", "attention_blocks.1": "attn2",
    "norms.0": "norm1", "norms.1": "norm2", "ff_norm": "norm3",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class MotionModule:
    """Motion-module weights in diffusers MotionAdapter keys, without position tables."""

    state: dict[str, torch.Tensor]
    max_frames: int | None  # length of the stored position tables (the longest clip trained on); None if unknown
    source: str

    @property
    def has_mid_block(self) -> bool:
        return any(key.startswith("mid_block.") for key in self.state)


# ------------------------------------------------------------------------------------------ key formats


def _is_position_table(key: str) -> bool:
    return key.endswith(".pos_encoder.pe") or key.endswith(".pos_embed.pe")


def _check_position_tables(state: dict[str, torch.Tensor], source: str) -> int | None:
    """The common length of the stored position tables, after checking they hold AnimateDiff's sinusoids."""
    lengths = set()
    for key, table in state.items():
        if not _is_position_table(key):
            continue
        if table.ndim != 3 or table.shape[0] != 1:
            raise UnsupportedBackboneError(f"{source}: {key} has shape {tuple(table.shape)}, expected [1, L, C]")
        expected = interleaved_sinusoids(table.shape[1], table.shape[2])
        if not torch.allclose(table.float(), expected, atol=1e-3):
            raise UnsupportedBackboneError(
                f"{source}: {key} is not AnimateDiff's sinusoidal position table (learned or altered positions); "
                "FaceVid regenerates the sinusoidal table and cannot reproduce this module")
        lengths.add(table.shape[1])
    if len(lengths) > 1:
        raise UnsupportedBackboneError(f"{source}: position tables of different lengths {sorted(lengths)}")
    return lengths.pop() if lengths else None


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original AnimateDiff keys -> diffusers MotionAdapter keys (position tables kept, renamed)."""
    converted = {}
    for key, value in state.items():
        new = key.replace(".temporal_transformer.", ".")
        for old, part in _ORIGINAL_RENAMES.items():
            new = new.replace(f".transformer_blocks.0.{old}.", f".transformer_blocks.0.{part}.")
        new = new.replace(".attn1.pos_encoder.pe", ".pos_embed.pe").replace(".attn2.pos_encoder.pe", ".pos_embed.pe")
        converted[new] = value  # both attentions hold the same table: one pos_embed.pe remains, as in diffusers
    return converted


def diffusers_to_original(state: dict[str, torch.Tensor], max_frames: int = 32) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter keys -> original AnimateDiff keys, with `max_frames`-long position tables for
    both attentions of every module (what the original code stores)."""
    inverse = {part: old for old, part in _ORIGINAL_RENAMES.items()}
    converted = {}
    for key, value in state.items():
        if _is_position_table(key):
            continue
        head, _, rest = key.partition(".motion_modules.")
        index, _, rest = rest.partition(".")
        for part, old in inverse.items():
            rest = rest.replace(f"transformer_blocks.0.{part}.", f"transformer_blocks.0.{old}.")
        prefix = f"{head}.motion_modules.{index}.temporal_transformer."
        converted[prefix + rest] = value
        if rest == "proj_in.weight":
            table = interleaved_sinusoids(max_frames, value.shape[0])[None].to(value.dtype)
            for attention in (0, 1):
                converted[f"{prefix}transformer_blocks.0.attention_blocks.{attention}.pos_encoder.pe"] = table.clone()
    return converted


def _check_supported(state: dict[str, torch.Tensor], source: str) -> None:
    for key in state:
        if ".motion_modules." not in key:
            raise UnsupportedBackboneError(
                f"{source}: key {key!r} is not a motion-module weight (a whole-UNet checkpoint, or PIA / "
                "SparseCtrl / LoRA extras, which are not supported; expected only "
                "{down_blocks|up_blocks|mid_block}.*.motion_modules.* keys)")
        if ".transformer_blocks." in key and ".transformer_blocks.0." not in key:
            raise UnsupportedBackboneError(
                f"{source}: key {key!r}: motion modules with more than one transformer block are not supported")


def motion_module_from_state(state: dict, source: str) -> MotionModule:
    """A MotionModule from a state dict in either key format (original keys are detected by
    `.temporal_transformer.`); a {"state_dict": ...} wrapper is unwrapped."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    bad = [f"{key!r} ({type(value).__name__})" for key, value in state.items()
           if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise UnsupportedBackboneError(
            f"{source}: not a plain tensor state dict (entries {', '.join(bad[:5])}); a motion module file must "
            "hold only tensors")
    max_frames = _check_position_tables(state, source)  # before renaming: the original stores two per module
    if any(".temporal_transformer." in key for key in state):
        state = original_to_diffusers(state)
    _check_supported(state, source)
    weights = {key: value for key, value in state.items() if not _is_position_table(key)}
    if not weights:
        raise UnsupportedBackboneError(f"{source}: holds no motion-module weights")
    return MotionModule(weights, max_frames, source)


# ------------------------------------------------------------------------------------------ files


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in PICKLE_SUFFIXES:
        raise UnsupportedBackboneError(
            f"{path}: unknown motion-module file type {path.suffix!r}; expected .safetensors or "
            f"{', '.join(PICKLE_SUFFIXES)} (or a diffusers MotionAdapter folder)")
    try:
        # weights_only: only tensors and plain containers are rebuilt; any other object is refused unbuilt.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UnsupportedBackboneError(
            f"{path}: refused: not a plain tensor checkpoint (loading it would need to run code or it is "
            f"damaged): {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise UnsupportedBackboneError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _every(value, expected) -> bool:
    """value == expected, or a (nested) per-block list whose entries all are."""
    if isinstance(value, (list, tuple)):
        return all(_every(v, expected) for v in value)
    return value == expected


def load_motion_module(path: str | Path) -> MotionModule:
    """A motion module from a diffusers MotionAdapter folder or a single weight file (either key format)."""
    path = Path(path)
    if path.is_dir():
        from diffusers import MotionAdapter

        if not (path / "config.json").is_file():
            raise UnsupportedBackboneError(f"{path}: a motion-module folder needs config.json (a diffusers "
                                           "MotionAdapter folder); or give the weight file itself")
        adapter = MotionAdapter.from_pretrained(path)
        config = adapter.config
        problems = [f"{key}={config[key]!r} (supported: {ok!r})" for key, ok in (
            ("motion_num_attention_heads", ANIMATEDIFF_HEADS), ("motion_transformer_layers_per_block", 1),
            ("motion_transformer_layers_per_mid_block", 1), ("motion_mid_block_layers_per_block", 1),
            ("conv_in_channels", None)) if not _every(config[key], ok)]
        if problems:
            raise UnsupportedBackboneError(f"{path}: unsupported MotionAdapter options: {'; '.join(problems)}")
        module = motion_module_from_state(adapter.state_dict(), str(path))
        module.max_frames = config["motion_max_seq_length"]
        return module
    if not path.is_file():
        raise UnsupportedBackboneError(f"motion module {path} not found (a MotionAdapter folder or a weight file)")
    module = motion_module_from_state(_load_file(path), str(path))
    logger.info("motion module %s: %s, position tables of %s frames (the longest clips it was trained on)", path,
                "with a mid-block module" if module.has_mid_block else "no mid-block module (v1)", module.max_frames)
    return module


# ------------------------------------------------------------------------------------------ model


def motion_key_map(model: FaceVidUNet3D) -> dict[str, str]:
    """FaceVidUNet3D temporal key -> diffusers MotionAdapter key (down_layers.i.j -> down_blocks.i.motion_modules.j,
    up_layers.k.j -> up_blocks.k.motion_modules.j, mid_layers.0 -> mid_block.motion_modules.0)."""
    places = {"down_layers": "down_blocks", "up_layers": "up_blocks"}
    mapping = {}
    for key in model.state_dict():
        ours, found, rest = key.partition(".temporal.")
        if not found:
            continue
        parts = ours.split(".")
        block = "mid_block" if parts[0] == "mid_layers" else f"{places[parts[0]]}.{parts[1]}"
        mapping[key] = f"{block}.motion_modules.{parts[-1]}.{_rename(rest, _TEMPORAL)}"
    return mapping


def facevid_config_from_unet2d_and_motion(unet2d_config: dict, temporal_norm: str = "frame") -> dict:
    """FaceVidUNet3D arguments: the UNet2DConditionModel's spatial layers, a motion module in every layer."""
    if temporal_norm not in TEMPORAL_NORMS:
        raise ValueError(f"motion-module norm must be one of {TEMPORAL_NORMS}, got {temporal_norm!r}")
    config = facevid_config_from_unet2d(unet2d_config)
    levels = len(config["block_out_channels"])
    return {**config, **ANIMATEDIFF_LAYOUT, "temporal_attention_levels": [True] * levels,
            "temporal_norm": temporal_norm}


def load_motion_weights(model: FaceVidUNet3D, motion: MotionModule) -> None:
    """Copy `motion` into the temporal layers of `model` (an ANIMATEDIFF_LAYOUT model); every motion weight must
    find its place and every temporal weight its source (a v1 module's absent mid block excepted)."""
    mapping = motion_key_map(model)
    if not motion.has_mid_block:
        mapping = {k: v for k, v in mapping.items() if not k.startswith("mid_layers.")}
    target = model.state_dict()
    unused = sorted(set(motion.state) - set(mapping.values()))
    absent = sorted(v for v in mapping.values() if v not in motion.state)
    shapes = [f"{theirs} {tuple(motion.state[theirs].shape)} vs {tuple(target[ours].shape)}"
              for ours, theirs in mapping.items()
              if theirs in motion.state and motion.state[theirs].shape != target[ours].shape]
    if unused or absent or shapes:
        raise UnsupportedBackboneError(
            f"{motion.source} does not fit this UNet (block_out_channels and layers_per_block must match the "
            f"motion module's): unplaced keys {unused[:4]}, missing keys {absent[:4]}, shape mismatches {shapes[:4]}")
    model.load_state_dict({ours: motion.state[theirs] for ours, theirs in mapping.items()}, strict=False)


def from_unet2d_and_motion(unet2d, motion: MotionModule, condition_channels: int = 0,
                           temporal_norm: str = "frame") -> FaceVidUNet3D:
    """A FaceVidUNet3D computing what AnimateDiff computes with `unet2d` (a UNet2DConditionModel) and `motion`."""
    config = facevid_config_from_unet2d_and_motion(dict(unet2d.config), temporal_norm)
    model = FaceVidUNet3D(**config, condition_channels=condition_channels)
    _load_mapped(model, unet2d.state_dict(), key_map(model, temporal=False), temporal=False)
    load_motion_weights(model, motion)
    return model.to(unet2d.dtype)


def to_motion_adapter(model: FaceVidUNet3D, max_frames: int = 32):
    """The temporal layers of an ANIMATEDIFF_LAYOUT model (e.g. fine-tuned on faces) as a diffusers MotionAdapter,
    for AnimateDiff tooling: `adapter.save_pretrained(folder)`, or the original checkpoint keys with
    `diffusers_to_original(adapter.state_dict(), max_frames)`. diffusers runs the modules with GroupNorm pooled
    over frames; a model trained with temporal_norm="frame" is reproduced exactly only by the original code."""
    from diffusers import MotionAdapter

    config = model.config
    if config.temporal_block != "animatediff":
        raise UnsupportedBackboneError(f"temporal_block={config.temporal_block!r}: only a model whose temporal "
                                       "layers are AnimateDiff motion modules exports as a MotionAdapter")
    adapter = MotionAdapter(block_out_channels=tuple(config.block_out_channels),
                            motion_layers_per_block=config.layers_per_block,
                            motion_norm_num_groups=config.norm_num_groups, motion_max_seq_length=max_frames,
                            use_motion_mid_block=True)
    state = model.state_dict()
    weights = {theirs: state[ours] for ours, theirs in motion_key_map(model).items()}
    missing, unexpected = adapter.load_state_dict(weights, strict=False)
    left = [key for key in missing if not _is_position_table(key)]  # diffusers builds its own tables
    if left or unexpected:
        raise UnsupportedBackboneError(f"MotionAdapter mismatch: missing {left[:4]}, unexpected {unexpected[:4]}")
    return adapter.to(model.dtype)
