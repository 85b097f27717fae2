"""The run configuration's schema: every key, its type, its default and what it means, and the values a
key accepts. facevid/config.py loads a YAML file into it; facevid/validation.py checks it before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


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
    # Frame windows per VAE encoder call while building the cache (x num_frames frames at once; decoding runs in
    # data.num_workers DataLoader workers meanwhile). null = 4 on an accelerator (lower it if the build runs out of
    # memory), 1 on a CPU, where bigger calls only thrash its caches (docs/cache.md).
    cache_encode_batch: Optional[int] = None
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
    # speed: data.target_fps when set, else the clips' fps / data.frame_stride, else 8 (facevid/stages/common.py:
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


def key_value(cfg: RunConfig, key: str):
    """The value of a dotted key, e.g. key_value(cfg, "train.batch_size")."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def fail(key: str, value, expected: str):
    """Raise the ConfigError every check raises: the key, its value, and what would be valid."""
    raise ConfigError(f"config key '{key}' = {value!r} is invalid: {expected}")
