"""Pretrained backbones in and out of FaceVidUNet3D.

- `load_pretrained_unet(path, format)`: a FaceVidUNet3D from a hub id or local folder holding a FaceVidUNet3D,
  a diffusers UNet3DConditionModel (ModelScope text-to-video, zeroscope) or a UNet2DConditionModel (Stable
  Diffusion 1.x / 2.x style); format "auto" reads `_class_name` from the folder's config.json (a pipeline folder
  with a unet/ subfolder works too).
- `from_unet3d` / `to_unet3d`: layer-for-layer weight mapping to and from UNet3DConditionModel. FaceVidUNet3D
  mirrors its structure with the UNET3D_LAYOUT options, so the mapping is exact (same outputs, tests/test_pretrained).
- `from_unet2d`: the image UNet's weights go into the spatial layers of a UNET3D_LAYOUT model whose temporal
  layers start as the identity, so the video model starts as the image model applied to every frame.
- `load_pretrained_unet(path, motion_module=...)`: an image UNet plus an AnimateDiff motion module as its temporal
  layers (models/animatediff.py).
- `unet3d_incompatibilities(config)`: why a FaceVidUNet3D cannot be exported as UNet3DConditionModel (empty if
  it can).
- `layout_options(layout, ...)`: the FaceVidUNet3D options of a named layout (config `unet.layout`); "modelscope"
  builds, from scratch, a model that is exactly a UNet3DConditionModel.
- `pretrained_scheduler_config(path)`: the noise schedule a pretrained pipeline was trained with, if it ships one.

Only the options listed in UNET3D_OPTIONS / UNET2D_OPTIONS are mapped; any other value is refused with the
option, its value and what is supported, rather than loading into a model that computes something else.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from models.unet3d import FaceVidUNet3D

FORMATS = ("auto", "facevid", "unet3d", "unet2d")
CLASS_FORMATS = {"FaceVidUNet3D": "facevid", "UNet3DConditionModel": "unet3d", "UNet2DConditionModel": "unet2d"}

# The FaceVidUNet3D options that reproduce UNet3DConditionModel's layers (see models/unet3d.py).
UNET3D_LAYOUT = {
    "ff_activation": "geglu",
    "temporal_conv": True,
    "temporal_block": "transformer",
    "input_temporal_transformer": True,
    "temporal_position_encoding": "none",
    "cross_attention_mask": False,
}

LAYOUTS = ("facevid", "modelscope")


def layout_options(layout: str, attention_levels, temporal_conv: bool = False) -> dict:
    """FaceVidUNet3D keyword arguments for a named layout (config unet.layout), given the configured attention
    levels and temporal_conv. facevid: FaceVid's own layers (temporal attention at every level, sinusoidal frame
    positions). modelscope: UNET3D_LAYOUT with temporal attention exactly where spatial attention is, i.e.
    diffusers' UNet3DConditionModel layer for layer (temporal_conv is part of it), so the trained model exports
    as a standard TextToVideoSDPipeline."""
    if layout == "facevid":
        return {"temporal_conv": temporal_conv}
    if layout == "modelscope":
        return {**UNET3D_LAYOUT, "temporal_attention_levels": tuple(attention_levels)}
    raise ValueError(f"unknown UNet layout {layout!r}; valid: {', '.join(LAYOUTS)}")


# Per diffusers option: the values the mapping supports (None = any value, read by the converter).
UNET3D_OPTIONS = {
    "sample_size": None, "in_channels": None, "out_channels": None, "down_block_types": None,
    "up_block_types": None, "block_out_channels": None, "layers_per_block": None, "norm_num_groups": None,
    "norm_eps": None, "cross_attention_dim": None, "attention_head_dim": None,
    "act_fn": ("silu",), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "num_attention_heads": (None,), "time_cond_proj_dim": (None,),
}
UNET2D_OPTIONS = {
    "sample_size": None, "in_channels": None, "out_channels": None, "down_block_types": None,
    "up_block_types": None, "block_out_channels": None, "layers_per_block": None, "norm_num_groups": None,
    "norm_eps": None, "cross_attention_dim": None, "attention_head_dim": None, "num_attention_heads": None,
    "dropout": None,
    # 1x1 conv and linear projections hold the same weights; upcasting only changes fp16 precision.
    "use_linear_projection": None, "upcast_attention": None, "addition_embed_type_num_heads": None,
    "act_fn": ("silu",), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,),
    "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None,), "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None,), "cross_attention_norm": (None,),
}


class UnsupportedBackboneError(ValueError):
    """A pretrained backbone uses an option the FaceVidUNet3D mapping does not reproduce."""


# ------------------------------------------------------------------------------------------ configs


def _uniform(value, name: str, problems: list[str]):
    """An int, or a per-level list whose entries are all equal -> that int."""
    if isinstance(value, int):
        return value
    if value and all(v == value[0] for v in value):
        return value[0]
    problems.append(f"{name}={value!r} (supported: one value for every level)")
    return None


def _allowed(value, allowed: tuple) -> bool:
    """value is allowed, or is a per-level list of allowed values."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(v in allowed for v in value)
    return value in allowed


def _check_options(config: dict, options: dict, problems: list[str]) -> None:
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in options:
            if value not in (None, False):  # an option newer than this converter, set to a non-default
                problems.append(f"{key}={value!r} (not an option this converter knows)")
        elif options[key] is not None and not _allowed(value, options[key]):
            problems.append(f"{key}={value!r} (supported: {', '.join(map(repr, options[key]))})")


def _attention_levels(config: dict, dims: str, problems: list[str]) -> list[bool]:
    """Which levels have cross-attention, from the block types (the up path must mirror the down path)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    known = {f"CrossAttnDownBlock{dims}": True, f"DownBlock{dims}": False}
    if any(t not in known for t in down):
        problems.append(f"down_block_types={down} (supported: {', '.join(known)})")
        return []
    levels = [known[t] for t in down]
    mirrored = [f"CrossAttnUpBlock{dims}" if a else f"UpBlock{dims}" for a in reversed(levels)]
    if up != mirrored:
        problems.append(f"up_block_types={up} (supported: the mirror of down_block_types, {mirrored})")
    return levels


def _raise_if(problems: list[str], kind: str) -> None:
    if problems:
        raise UnsupportedBackboneError(
            f"cannot initialise FaceVidUNet3D from this {kind}: " + "; ".join(problems)
            + ". Supported options are listed in models/pretrained.py."
        )


def _common_config(config: dict, dims: str, options: dict, problems: list[str]) -> dict:
    _check_options(config, options, problems)
    levels = _attention_levels(config, dims, problems)
    if config.get("norm_num_groups") is None:
        problems.append("norm_num_groups=None (supported: an int)")
    if not isinstance(config.get("cross_attention_dim"), int):
        problems.append(f"cross_attention_dim={config.get('cross_attention_dim')!r} (supported: an int)")
    layers = _uniform(config["layers_per_block"], "layers_per_block", problems)
    return dict(
        in_channels=config["in_channels"], out_channels=config["out_channels"],
        block_out_channels=list(config["block_out_channels"]), layers_per_block=layers,
        attention_levels=levels, temporal_attention_levels=levels,
        cross_attention_dim=config["cross_attention_dim"], norm_num_groups=config["norm_num_groups"],
        norm_eps=config["norm_eps"], **UNET3D_LAYOUT,
    )


def facevid_config_from_unet3d(config: dict) -> dict:
    """FaceVidUNet3D arguments that rebuild a UNet3DConditionModel config layer for layer."""
    problems: list[str] = []
    result = _common_config(config, "3D", UNET3D_OPTIONS, problems)
    # UNet3DConditionModel's attention_head_dim really is channels per head (heads = channels // it).
    head_dim = _uniform(config["attention_head_dim"], "attention_head_dim", problems)
    if head_dim is not None and any(c % head_dim or c < head_dim for c in config["block_out_channels"]):
        problems.append(f"attention_head_dim={head_dim} (supported: divides every block_out_channels entry)")
    _raise_if(problems, "UNet3DConditionModel")
    return {**result, "attention_head_dim": head_dim}


def facevid_config_from_unet2d(config: dict) -> dict:
    """FaceVidUNet3D arguments whose spatial layers rebuild a UNet2DConditionModel, temporal layers added."""
    problems: list[str] = []
    result = _common_config(config, "2D", UNET2D_OPTIONS, problems)
    channels = list(config["block_out_channels"])
    # UNet2DConditionModel's attention_head_dim is, for historical reasons, the number of heads.
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if len(heads) != len(channels) or any(c % h for c, h in zip(channels, heads)):
        problems.append(f"attention heads {heads} (supported: one count per level dividing its channels)")
    _raise_if(problems, "UNet2DConditionModel")
    head_dims = [c // h for c, h in zip(channels, heads)]
    return {**result, "attention_head_dim": head_dims[0] if len(set(head_dims)) == 1 else head_dims,
            "dropout": config.get("dropout", 0.0)}


def unet3d_incompatibilities(config) -> list[str]:
    """Why a FaceVidUNet3D config has no UNet3DConditionModel equivalent; empty when it has one."""
    if "block_out_channels" not in config:  # another backbone (models/dit.py)
        return ["its backbone is a diffusion transformer (unet.backbone=dit), not a UNet"]
    problems = [f"{key}={config[key]!r} (UNet3DConditionModel: {value!r})"
                for key, value in UNET3D_LAYOUT.items() if config[key] != value]
    if config["condition_channels"]:
        problems.append(f"condition_channels={config['condition_channels']} (UNet3DConditionModel has no "
                        "conditioning input: image-to-video needs the FaceVid pipeline)")
    if config.get("pooled_text_conditioning"):  # configs saved before the option existed lack its key
        problems.append("pooled_text_conditioning=True (UNet3DConditionModel has no pooled-text path)")
    levels = list(config["attention_levels"])
    temporal = config["temporal_attention_levels"]
    temporal = [True] * len(levels) if temporal is None else list(temporal)  # None = every level
    if temporal != levels:
        problems.append(f"temporal_attention_levels={temporal} (UNet3DConditionModel: equal to "
                        f"attention_levels, {levels})")
    head_dim = config["attention_head_dim"]
    if not isinstance(head_dim, int) and len(set(head_dim)) > 1:
        problems.append(f"attention_head_dim={list(head_dim)} (UNet3DConditionModel: one value for all levels)")
    else:
        head_dim = head_dim if isinstance(head_dim, int) else head_dim[0]
        if any(c % head_dim or c < head_dim for c in config["block_out_channels"]):
            problems.append(f"attention_head_dim={head_dim} does not divide every block_out_channels entry")
    return problems


def unet3d_config(config, sample_size: int | None = None) -> dict:
    """The UNet3DConditionModel config equivalent to a compatible FaceVidUNet3D config."""
    levels = list(config["attention_levels"])
    head_dim = config["attention_head_dim"]
    return dict(
        sample_size=sample_size, in_channels=config["in_channels"], out_channels=config["out_channels"],
        down_block_types=["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in levels],
        up_block_types=["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(levels)],
        block_out_channels=list(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
        norm_num_groups=config["norm_num_groups"], norm_eps=config["norm_eps"],
        cross_attention_dim=config["cross_attention_dim"],
        attention_head_dim=head_dim if isinstance(head_dim, int) else head_dim[0],
    )


# ------------------------------------------------------------------------------------------ weights

_BLOCK = "transformer_blocks.0."
_FEED_FORWARD = {"ff.0": _BLOCK + "ff.net.0", "ff.2": _BLOCK + "ff.net.2"}  # GEGLU(proj), Dropout, Linear
_RESNET = {"shortcut": "conv_shortcut"}
_SPATIAL = {
    "norm_self": _BLOCK + "norm1", "self_attn.to_out": _BLOCK + "attn1.to_out.0", "self_attn": _BLOCK + "attn1",
    "norm_cross": _BLOCK + "norm2", "cross_attn.to_out": _BLOCK + "attn2.to_out.0", "cross_attn": _BLOCK + "attn2",
    "norm_ff": _BLOCK + "norm3", **_FEED_FORWARD,
}
_TEMPORAL = {
    "norm_attn": _BLOCK + "norm1", "attn.to_out": _BLOCK + "attn1.to_out.0", "attn": _BLOCK + "attn1",
    "norm_attn2": _BLOCK + "norm2", "attn2.to_out": _BLOCK + "attn2.to_out.0", "attn2": _BLOCK + "attn2",
    "norm_ff": _BLOCK + "norm3", **_FEED_FORWARD,
}
# Module-name parts of the layers an image UNet lacks (also what train.trainable=temporal trains).
TEMPORAL_MODULES = (".temporal.", ".temporal_conv.", "input_layer.")


def _module_pairs(config, temporal: bool) -> list[tuple[str, str, dict]]:
    """(FaceVidUNet3D module, diffusers module, renames inside it) for every mapped module."""
    pairs = [("conv_in", "conv_in", {}), ("time_embedding", "time_embedding", {}),
             ("norm_out", "conv_norm_out", {}), ("conv_out", "conv_out", {})]
    if temporal:
        pairs.append(("input_layer.temporal", "transformer_in", _TEMPORAL))

    def layer(ours: str, block: str, index: int, attention: bool) -> None:
        pairs.append((f"{ours}.resnet", f"{block}.resnets.{index}", _RESNET))
        if temporal:
            pairs.append((f"{ours}.temporal_conv", f"{block}.temp_convs.{index}", {}))
        if attention:
            pairs.append((f"{ours}.spatial", f"{block}.attentions.{index}", _SPATIAL))
            if temporal:
                pairs.append((f"{ours}.temporal", f"{block}.temp_attentions.{index}", _TEMPORAL))

    levels = list(config["attention_levels"])
    count = len(levels)
    for level, attention in enumerate(levels):
        for i in range(config["layers_per_block"]):
            layer(f"down_layers.{level}.{i}", f"down_blocks.{level}", i, attention)
        if level < count - 1:
            pairs.append((f"downsamplers.{level}", f"down_blocks.{level}.downsamplers.0.conv", {}))
    layer("mid_layers.0", "mid_block", 0, True)
    layer("mid_layers.1", "mid_block", 1, False)
    for k, attention in enumerate(reversed(levels)):
        for i in range(config["layers_per_block"] + 1):
            layer(f"up_layers.{k}.{i}", f"up_blocks.{k}", i, attention)
        if k < count - 1:
            pairs.append((f"upsamplers.{k}.conv", f"up_blocks.{k}.upsamplers.0.conv", {}))
    return pairs


def _rename(rest: str, renames: dict) -> str:
    for ours in sorted(renames, key=len, reverse=True):
        if rest == ours or rest.startswith(ours + "."):
            return renames[ours] + rest[len(ours):]
    return rest


def key_map(model: FaceVidUNet3D, temporal: bool = True) -> dict[str, str]:
    """FaceVidUNet3D state-dict key -> diffusers UNet3D (temporal=True) / UNet2D (False) key."""
    pairs = _module_pairs(model.config, temporal)
    mapping = {}
    for key in model.state_dict():
        matches = [p for p in pairs if key.startswith(p[0] + ".")]
        if matches:
            ours, theirs, renames = max(matches, key=lambda p: len(p[0]))
            mapping[key] = f"{theirs}.{_rename(key[len(ours) + 1:], renames)}"
    return mapping


def _fit(name: str, tensor: torch.Tensor, shape) -> torch.Tensor:
    shape = tuple(shape)
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.shape[:2] == shape[:2] and tensor.numel() == math.prod(shape):
        return tensor.reshape(shape)  # 1x1 conv <-> linear projection: the same weights
    if name == "conv_in.weight" and tensor.shape[0] == shape[0] and tensor.shape[1] < shape[1]:
        # Extra input channels (an image-to-video condition) start at zero: the model ignores them at first.
        extra = tensor.new_zeros(shape[0], shape[1] - tensor.shape[1], *shape[2:])
        return torch.cat([tensor, extra], dim=1)
    raise ValueError(f"{name}: cannot fit a tensor of shape {tuple(tensor.shape)} into {shape}")


def _load_mapped(model: FaceVidUNet3D, source: dict, mapping: dict[str, str], temporal: bool) -> None:
    unused = sorted(set(source) - set(mapping.values()))
    absent = sorted(v for v in mapping.values() if v not in source)
    # Without temporal source weights (2D), the temporal layers keep their identity initialisation.
    unmapped = sorted(k for k in model.state_dict() if k not in mapping
                      and (temporal or not any(m in "." + k for m in TEMPORAL_MODULES)))
    if unused or absent or unmapped:
        raise UnsupportedBackboneError(
            f"weight mapping mismatch: source keys not mapped {unused[:5]}, mapped keys missing in the source "
            f"{absent[:5]}, FaceVidUNet3D keys without a source {unmapped[:5]}")
    target = model.state_dict()
    state = {ours: _fit(ours, source[theirs], target[ours].shape) for ours, theirs in mapping.items()}
    model.load_state_dict(state, strict=False)


def from_unet3d(unet3d, condition_channels: int = 0) -> FaceVidUNet3D:
    """A FaceVidUNet3D computing what `unet3d` (a diffusers UNet3DConditionModel) computes."""
    model = FaceVidUNet3D(**facevid_config_from_unet3d(dict(unet3d.config)), condition_channels=condition_channels)
    _load_mapped(model, unet3d.state_dict(), key_map(model, temporal=True), temporal=True)
    return model


def from_unet2d(unet2d, condition_channels: int = 0) -> FaceVidUNet3D:
    """A FaceVidUNet3D that applies `unet2d` (a UNet2DConditionModel) to every frame, until its temporal layers
    (identity at initialisation) are trained."""
    model = FaceVidUNet3D(**facevid_config_from_unet2d(dict(unet2d.config)), condition_channels=condition_channels)
    _load_mapped(model, unet2d.state_dict(), key_map(model, temporal=False), temporal=False)
    return model


def to_unet3d(model: FaceVidUNet3D, sample_size: int | None = None):
    """The diffusers UNet3DConditionModel computing what `model` computes; refused when it has no equivalent."""
    from diffusers import UNet3DConditionModel

    problems = unet3d_incompatibilities(model.config)
    if problems:
        raise UnsupportedBackboneError("this FaceVidUNet3D has no UNet3DConditionModel equivalent: "
                                       + "; ".join(problems))
    target = UNet3DConditionModel(**unet3d_config(model.config, sample_size))
    mapping = key_map(model, temporal=True)
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    if set(mapping) != set(model.state_dict()) or set(mapping.values()) != set(shapes):
        raise UnsupportedBackboneError("weight mapping mismatch between FaceVidUNet3D and UNet3DConditionModel")
    state = model.state_dict()
    target.load_state_dict({theirs: _fit(theirs, state[ours], shapes[theirs]) for ours, theirs in mapping.items()})
    return target if model.dtype == torch.float32 else target.to(model.dtype)


def with_condition_channels(model: FaceVidUNet3D, condition_channels: int) -> FaceVidUNet3D:
    """The same model with `condition_channels` extra input channels (zero-initialised) for image-to-video."""
    current = model.config.condition_channels
    if current == condition_channels:
        return model
    if current:
        raise UnsupportedBackboneError(
            f"the pretrained UNet takes {current} condition channels (an image-to-video model) but this task "
            f"needs {condition_channels}; start from a text-to-video or unconditional UNet instead")
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    extended = FaceVidUNet3D(**{**config, "condition_channels": condition_channels})
    state = model.state_dict()
    state["conv_in.weight"] = _fit("conv_in.weight", state["conv_in.weight"], extended.conv_in.weight.shape)
    extended.load_state_dict(state)
    return extended


# ------------------------------------------------------------------------------------------ loading


def detect_format(path: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """(format, subfolder) of a pretrained UNet from its config.json `_class_name`. A pipeline folder or repo
    (model_index.json plus unet/) resolves to its unet/ subfolder."""
    try:
        config = FaceVidUNet3D.load_config(path, subfolder=subfolder)
    except OSError:
        if subfolder is not None:
            raise
        subfolder = "unet"
        config = FaceVidUNet3D.load_config(path, subfolder=subfolder)
    name = config.get("_class_name")
    if name not in CLASS_FORMATS:
        raise UnsupportedBackboneError(
            f"{Path(path) / (subfolder or '')}: config.json names class {name!r}; supported: "
            f"{', '.join(CLASS_FORMATS)} (or set unet.pretrained_format)")
    return CLASS_FORMATS[name], subfolder


def pretrained_scheduler_config(path: str, subfolder: str | None = None) -> tuple[dict, str] | None:
    """(config, where) of the noise scheduler shipped with a pretrained UNet: scheduler/scheduler_config.json of
    the pipeline folder or repo `path`, or of the parent of a local unet folder; None when there is none."""
    from diffusers import DDPMScheduler

    local = Path(path) / (subfolder or "")
    if local.is_dir():
        for folder in (Path(path), local.parent):
            config_file = folder / "scheduler" / "scheduler_config.json"
            if config_file.is_file():
                return DDPMScheduler.load_config(str(folder), subfolder="scheduler"), str(config_file)
        return None
    try:  # a hub repo: its scheduler/ folder, when it has one
        return DDPMScheduler.load_config(path, subfolder="scheduler"), f"{path}/scheduler/scheduler_config.json"
    except (OSError, ValueError):
        return None


def load_pretrained_unet(path: str, format: str = "auto", subfolder: str | None = None,
                         condition_channels: int = 0, motion_module: str | None = None,
                         motion_module_norm: str = "frame") -> FaceVidUNet3D:
    """A FaceVidUNet3D initialised from `path` (hub id or folder) in `format` (see FORMATS). With
    `motion_module` (an AnimateDiff motion module: MotionAdapter folder or weight file, models/animatediff.py)
    `path` must be an image UNet, and the motion module becomes its temporal layers."""
    if format not in FORMATS:
        raise ValueError(f"unknown pretrained format {format!r}; valid: {', '.join(FORMATS)}")
    if format == "auto":
        format, subfolder = detect_format(path, subfolder)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if motion_module is not None:
        from diffusers import UNet2DConditionModel

        from models.animatediff import from_unet2d_and_motion, load_motion_module

        if format != "unet2d":
            raise UnsupportedBackboneError(
                f"an AnimateDiff motion module goes into an image UNet (format unet2d, e.g. Stable Diffusion 1.5), "
                f"but {path} is format {format!r}")
        motion = load_motion_module(motion_module)  # first: a bad file fails before the UNet loads
        return from_unet2d_and_motion(UNet2DConditionModel.from_pretrained(path, **kwargs), motion,
                                      condition_channels, motion_module_norm)
    if format == "facevid":
        return with_condition_channels(FaceVidUNet3D.from_pretrained(path, **kwargs), condition_channels)
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    if format == "unet3d":
        return from_unet3d(UNet3DConditionModel.from_pretrained(path, **kwargs), condition_channels)
    return from_unet2d(UNet2DConditionModel.from_pretrained(path, **kwargs), condition_channels)
