"""Checks of a loaded run configuration, before any work starts: each failure is a ConfigError naming the key,
the value and what would be valid. Also the plug-in module (plugin.module), which validates its own options."""

from __future__ import annotations

import importlib
from pathlib import Path

from facevid.hub import (
    check_hub_models,
    looks_local,
    resolve_pretrained,
    text_encoder_positions,
    vae_downscale_factor,
)
from facevid.schema import CHOICES, EVAL_METRICS, RunConfig, fail, key_value

# UNet-only keys and the value that means "not used": refused with unet.backbone=dit rather than ignored.
_UNET_ONLY_KEYS = {"unet.motion_module": None, "unet.layout": "facevid",
                   "unet.temporal_conv": False, "unet.temporal_feed_forward": False}


def _validate_dit(cfg: RunConfig) -> None:
    for key, unused in _UNET_ONLY_KEYS.items():
        if key_value(cfg, key) != unused:
            fail(key, key_value(cfg, key), f"is a FaceVidUNet3D option; with unet.backbone=dit set it to {unused} "
                  "(or unet.backbone=unet)")
    d = cfg.unet.dit
    if d.hidden_size % d.num_heads:
        fail("unet.dit.hidden_size", d.hidden_size, f"must be a multiple of unet.dit.num_heads ({d.num_heads})")


def validate(cfg: RunConfig) -> None:
    for key, valid in CHOICES.items():
        value = key_value(cfg, key)
        if value not in valid:
            fail(key, value, f"must be one of {', '.join(valid)}")

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
        if key_value(cfg, key) < 1:
            fail(key, key_value(cfg, key), "must be an integer >= 1")
    if cfg.data.cache_encode_batch is not None and cfg.data.cache_encode_batch < 1:
        fail("data.cache_encode_batch", cfg.data.cache_encode_batch, "must be an integer >= 1, or null (4 on an "
             "accelerator, 1 on a CPU)")
    for key in ["data.num_workers", "train.lr_warmup_steps", "train.validate_every",
                "train.replica_check_every", "train.val_loss_clips", "train.max_nonfinite_steps", "eval.every", "vae.layers_per_block",
                "vae.kl_weight"]:
        if key_value(cfg, key) < 0:
            fail(key, key_value(cfg, key), "must be >= 0")
    for key in ["train.learning_rate", "train.max_grad_norm"]:
        if not key_value(cfg, key) > 0:
            fail(key, key_value(cfg, key), "must be > 0")
    if cfg.sample.fps is not None and not cfg.sample.fps > 0:
        fail("sample.fps", cfg.sample.fps, "must be > 0, or null for the fps the model is trained at")
    if cfg.data.prefetch_factor is not None and cfg.data.prefetch_factor < 1:
        fail("data.prefetch_factor", cfg.data.prefetch_factor, "must be an integer >= 1 (batches each worker "
              "loads ahead), or null for torch's default (2)")
    if cfg.train.compile == "blocks" and cfg.stage != "t2v":
        fail("train.compile", "blocks", f"compiles the UNet's / DiT's repeated blocks (stage t2v); stage "
              f"{cfg.stage} has none: use full or none")
    if not 0.0 <= cfg.data.caption_dropout < 1.0:
        fail("data.caption_dropout", cfg.data.caption_dropout, "must be in [0, 1)")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        fail("train.ema_decay", cfg.train.ema_decay, "must be in (0, 1), or null to disable EMA")
    if cfg.diffusion.min_snr_gamma is not None and cfg.diffusion.min_snr_gamma <= 0:
        fail("diffusion.min_snr_gamma", cfg.diffusion.min_snr_gamma, "must be > 0, or null to disable")
    if not 0.0 <= cfg.diffusion.frame_noise_correlation < 1.0:
        fail("diffusion.frame_noise_correlation", cfg.diffusion.frame_noise_correlation,
              "must be in [0, 1) (0 = independent noise per frame)")
    if cfg.data.target_fps is not None and cfg.data.target_fps <= 0:
        fail("data.target_fps", cfg.data.target_fps, "must be > 0, or null to use data.frame_stride")
    if cfg.diffusion.zero_terminal_snr and cfg.diffusion.prediction_type != "v_prediction":
        fail("diffusion.zero_terminal_snr", True, "needs diffusion.prediction_type=v_prediction "
              "(epsilon cannot be predicted at the pure-noise step)")
    if cfg.sample.guidance_scale < 1.0:
        fail("sample.guidance_scale", cfg.sample.guidance_scale, "must be >= 1 (1 = no guidance)")
    if not 0.0 <= cfg.sample.guidance_rescale <= 1.0:
        fail("sample.guidance_rescale", cfg.sample.guidance_rescale, "must be in [0, 1] (0 = off, e.g. 0.7)")
    if cfg.unet.layout == "modelscope" and cfg.unet.pooled_text_conditioning and not cfg.unet.pretrained:
        fail("unet.pooled_text_conditioning", True, "UNet3DConditionModel (unet.layout=modelscope) has no "
              "pooled-text path: set it to false, or unet.layout=facevid")

    levels = len(cfg.unet.block_out_channels)
    if levels < 1 or len(cfg.unet.attention_levels) != levels:
        fail("unet.attention_levels", list(cfg.unet.attention_levels),
              f"needs one true/false per entry of unet.block_out_channels ({levels})")
    if any(c % cfg.unet.norm_num_groups for c in cfg.unet.block_out_channels):
        fail("unet.block_out_channels", list(cfg.unet.block_out_channels),
              f"every entry must be divisible by unet.norm_num_groups ({cfg.unet.norm_num_groups})")
    if cfg.vae.layers_per_block == 0 and len(set(cfg.vae.block_out_channels)) > 1:
        fail("vae.block_out_channels", list(cfg.vae.block_out_channels), "with vae.layers_per_block=0 (no ResNet "
              "block between resolutions) every level must have the same width, e.g. [64, 64, 64]")
    if any(c % 32 for c in cfg.vae.block_out_channels):
        fail("vae.block_out_channels", list(cfg.vae.block_out_channels),
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
        fail("data.resolution", cfg.data.resolution,
              f"must be a multiple of {multiple} (VAE factor {vae_factor} x UNet factor {unet_factor}); "
              f"e.g. {max(multiple, cfg.data.resolution // multiple * multiple)}")

    if cfg.data.buckets:
        _validate_buckets(cfg, (vae_factor or 1) * unet_factor)

    if cfg.data.cache != "none" and not cfg.data.cache_dir:
        fail("data.cache_dir", None, f"data.cache={cfg.data.cache} needs a folder for the cache")
    if cfg.data.cache == "use":
        from data.cache import cache_state, shard_files  # imports torch: only when a cache is used

        state = cache_state(cfg.data.cache_dir)
        if state == "missing":
            fail("data.cache_dir", cfg.data.cache_dir, "holds no cache; build it with `accelerate launch cache.py "
                  "--config <your config>` or set data.cache=auto")
        if state == "incomplete":
            fail("data.cache_dir", cfg.data.cache_dir, f"holds an incomplete cache: its build stopped before the "
                  f"end ({len(shard_files(cfg.data.cache_dir))} shard(s) written, no complete.json), so some clips "
                  f"are missing. Finish it with `accelerate launch cache.py --config <your config>` (it resumes "
                  f"where it stopped) or train with data.cache=auto")

    if not Path(cfg.data.manifest).is_file():
        fail("data.manifest", cfg.data.manifest, "file not found (FaceVid-Synth: generate it first with "
              "`python -m data.synth --out FOLDER`)")

    crop = cfg.vae.train_crop
    if crop is not None and not (0 < crop <= cfg.data.resolution and crop % (vae_factor or 1) == 0):
        fail("vae.train_crop", crop, f"must be a multiple of the VAE factor {vae_factor} and at most "
              f"data.resolution ({cfg.data.resolution}), or null for whole frames")
    if cfg.stage == "vae" and cfg.data.cache != "none":
        fail("data.cache", cfg.data.cache, "the VAE stage trains on pixels: set data.cache=none")
    if cfg.stage == "t2v":
        if not cfg.vae.pretrained:
            fail("vae.pretrained", None, "stage t2v needs a VAE: a hub id (e.g. stabilityai/sd-vae-ft-mse) "
                  "or a local AutoencoderKL folder (e.g. the vae/ folder written by stage vae)")
        if looks_local(cfg.vae.pretrained) and not Path(cfg.vae.pretrained).exists():
            fail("vae.pretrained", cfg.vae.pretrained, "local folder not found (run the VAE stage first, "
                  "or give a hub id)")
        if cfg.unet.pretrained and looks_local(cfg.unet.pretrained) and not Path(cfg.unet.pretrained).exists():
            fail("unet.pretrained", cfg.unet.pretrained, "local folder not found")
        if cfg.unet.motion_module and not cfg.unet.pretrained:
            fail("unet.motion_module", cfg.unet.motion_module, "needs unet.pretrained: the image UNet (e.g. Stable "
                  "Diffusion 1.5) whose temporal layers it becomes")
        if cfg.unet.motion_module and not Path(cfg.unet.motion_module).exists():
            fail("unet.motion_module", cfg.unet.motion_module, "not found (a diffusers MotionAdapter folder or "
                  "an AnimateDiff .ckpt / .safetensors file)")
    encoder = resolve_pretrained(cfg.text_encoder.pretrained)
    if looks_local(encoder) and not Path(encoder).exists():
        fail("text_encoder.pretrained", cfg.text_encoder.pretrained, "local folder not found")
    check_hub_models(cfg)
    positions = text_encoder_positions(cfg)
    if positions is not None and cfg.text_encoder.max_length > positions:
        fail("text_encoder.max_length", cfg.text_encoder.max_length, f"must be at most {positions}: the text "
              f"encoder {cfg.text_encoder.pretrained} has {positions} token positions")
    _validate_evaluation(cfg)
    _validate_trainable(cfg)
    _validate_image_batches(cfg)
    import_plugin(cfg)
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        fail("resume", cfg.resume, "must be 'latest' or an existing checkpoint folder")


def _validate_trainable(cfg: RunConfig) -> None:
    """What can be checked without the model; facevid/trainable.py checks the patterns against its names."""
    t = cfg.train
    if t.trainable == "patterns" and not t.trainable_include:
        fail("train.trainable_include", [], "train.trainable=patterns trains only what it names: give at least "
              "one pattern, e.g. ['*.temporal.*']")
    if t.trainable != "lora":
        return
    if cfg.stage != "t2v":
        fail("train.trainable", "lora", "LoRA adapters are for the UNet of stage t2v")
    if t.trainable_include or t.trainable_exclude:
        fail("train.trainable_include" if t.trainable_include else "train.trainable_exclude",
              list(t.trainable_include or t.trainable_exclude),
              "is not used with train.trainable=lora (choose the adapted layers with lora.target_modules)")
    if cfg.lora.rank < 1:
        fail("lora.rank", cfg.lora.rank, "must be an integer >= 1")
    if not cfg.lora.alpha > 0:
        fail("lora.alpha", cfg.lora.alpha, "must be > 0 (the adapter's scale is alpha / rank)")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        fail("lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
    if not cfg.lora.target_modules:
        fail("lora.target_modules", [], "needs at least one pattern, e.g. ['*.to_q', '*.to_v']")


def _validate_image_batches(cfg: RunConfig) -> None:
    share = cfg.data.image_batch_share
    if not 0.0 <= share <= 1.0:
        fail("data.image_batch_share", share, "must be in [0, 1] (the share of steps that are image batches)")
    if share == 0.0:
        return
    if cfg.stage != "t2v" or cfg.task == "i2v":
        fail("data.image_batch_share", share, f"image batches train the UNet of stage t2v for task t2v or uncond "
              f"(got stage={cfg.stage}, task={cfg.task}; an i2v image batch would be given its own frame)")
    if cfg.data.buckets:
        fail("data.image_batch_share", share, "is not combined with data.buckets yet: set data.buckets=[]")
    if cfg.train.trainable == "temporal":
        fail("data.image_batch_share", share, "image batches skip the temporal layers, the only ones "
              "train.trainable=temporal trains: set it to 0 or train more than the temporal layers")


def _validate_buckets(cfg: RunConfig, multiple: int) -> None:
    from data.buckets import parse_buckets  # imports torch: only when buckets are used

    try:
        parse_buckets(list(cfg.data.buckets), multiple_of=multiple)
    except ValueError as err:
        fail("data.buckets", list(cfg.data.buckets), f"{err} (VAE factor x UNet factor = {multiple})")
    if cfg.stage != "t2v" or cfg.task == "i2v" or cfg.data.cache != "none":
        fail("data.buckets", list(cfg.data.buckets), "buckets are for stage t2v, task t2v or uncond, with "
              f"data.cache=none (got stage={cfg.stage}, task={cfg.task}, data.cache={cfg.data.cache})")
    if not 0 <= cfg.data.bucket_max_crop < 1:
        fail("data.bucket_max_crop", cfg.data.bucket_max_crop, "must be in [0, 1)")


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
        fail("data.num_frames", d.num_frames, f"no clip is long enough: a window of {d.num_frames} frames at "
              f"{timing} spans {needed} frames, and the longest of the {len(records[::step][:probe_limit])} clips "
              f"checked has {usable} usable ({video}). Lower data.num_frames or the stride")


def _validate_evaluation(cfg: RunConfig) -> None:
    """Evaluation during training must not fail hours in: check its weights and prompts now."""
    e = cfg.eval
    unknown = [m for m in e.metrics if m not in EVAL_METRICS]
    if unknown or not e.metrics:
        fail("eval.metrics", list(e.metrics), f"each must be one of {', '.join(EVAL_METRICS)}")
    if not e.every:
        return
    if cfg.stage != "t2v" or cfg.task != "t2v":
        fail("eval.every", e.every, "evaluation during training is for stage t2v with task t2v; set eval.every=0")
    for metric, name, path, what in (("fvd", "i3d", e.i3d, "the I3D TorchScript file"),
                                     ("fid", "inception", e.inception, "the Inception TorchScript file")):
        if metric in e.metrics and not Path(path).is_file():
            fail(f"eval.{name}", path, f"file not found: eval.metrics has {metric}, which needs "
                  f"{what} (see the README's Evaluation section), or drop {metric} from eval.metrics")
    if "clip" in e.metrics and looks_local(e.clip) and not Path(e.clip).exists():
        fail("eval.clip", e.clip, "local folder not found (a CLIPModel folder or hub id)")
    if e.prompts_file and not Path(e.prompts_file).is_file():
        fail("eval.prompts_file", e.prompts_file, "file not found (one prompt per line)")
    if e.reference_manifest and not Path(e.reference_manifest).is_file():
        fail("eval.reference_manifest", e.reference_manifest, "file not found")


def import_plugin(cfg: RunConfig):
    """The plug-in module named by plugin.module, its options validated (its `validate(cfg)`); None if none."""
    if cfg.plugin.module is None:
        if cfg.plugin.options:
            fail("plugin.options", dict(cfg.plugin.options), "set plugin.module, the module these options are for")
        return None
    try:
        module = importlib.import_module(cfg.plugin.module)
    except ImportError as err:
        fail("plugin.module", cfg.plugin.module, f"cannot be imported ({err})")
    validate_plugin = getattr(module, "validate", None)
    if validate_plugin is not None:
        validate_plugin(cfg)
    return module
