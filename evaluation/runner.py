"""evaluate_run: generate videos for a prompt set with a run's pipeline, compute the metrics, write
metrics.json, metrics.md and a contact sheet. Used by evaluate.py, and callable from training with
an already-loaded pipeline and already-loaded feature extractors."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.video import read_frames
from evaluation import metrics as M
from evaluation.features import ClipFeatures, I3DFeatures, InceptionFeatures, MissingWeightsError, file_sha256
from evaluation.prompts import (
    EvalPrompt,
    heldout_prompts,
    manifest_attributes,
    prompts_from_manifest,
    render_reference,
)
from facevid.schema import EVAL_METRICS as METRICS
from facevid.schema import EvaluationConfig

logger = logging.getLogger("facevid")



def check_metrics(metrics) -> tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or '(none given)'}: choose from {', '.join(METRICS)}")
    return metrics


@dataclass
class Extractors:
    """Loaded feature networks, reusable across evaluations (e.g. every N training steps)."""

    i3d: I3DFeatures | None = None
    inception: InceptionFeatures | None = None
    clip: ClipFeatures | None = None
    metrics: tuple[str, ...] = field(default_factory=tuple)


def load_extractors(config: EvaluationConfig, loaded: Extractors | None = None, device: str = "cpu") -> Extractors:
    """Load what the configured metrics need (keeping what `loaded` already holds); every missing
    weight file is reported at once, before any video is generated."""
    metrics = check_metrics(config.metrics)
    loaders = {"fvd": ("i3d", lambda: I3DFeatures(config.i3d, device)),
               "fid": ("inception", lambda: InceptionFeatures(config.inception, device)),
               "clip": ("clip", lambda: ClipFeatures(config.clip, device))}
    extractors = Extractors() if loaded is None else loaded
    errors = []
    for metric in metrics:
        if metric in loaders and getattr(extractors, loaders[metric][0]) is None:
            name, load = loaders[metric]
            try:
                setattr(extractors, name, load())
            except MissingWeightsError as err:
                errors.append(str(err))
    if errors:
        raise MissingWeightsError("\n".join(errors))
    extractors.metrics = tuple(dict.fromkeys(extractors.metrics + metrics))
    return extractors


# ----------------------------------------------------------------------------- videos


def generate_videos(pipeline, prompts: Sequence[str], config: EvaluationConfig, run_config) -> np.ndarray:
    """uint8 (N, T, H, W, 3); video i uses seed config.seed + i, so batching does not change it."""
    s, d = run_config.sample, run_config.data
    pick = lambda value, default: default if value is None else value  # noqa: E731
    kwargs = dict(
        negative_prompt=pick(config.negative_prompt, s.negative_prompt),
        num_frames=pick(config.num_frames, d.num_frames), resolution=pick(config.resolution, d.resolution),
        num_inference_steps=pick(config.steps, s.num_inference_steps),
        guidance_scale=pick(config.guidance_scale, s.guidance_scale), scheduler=pick(config.scheduler, s.scheduler),
    )
    out = []
    for start in range(0, len(prompts), config.batch_size):
        out.append(pipeline(list(prompts[start:start + config.batch_size]), seed=config.seed + start, **kwargs))
    return np.concatenate(out)


RENDERED = "held-out FaceVid-Synth ground truth, rendered"


def reference_videos(prompts: Sequence[EvalPrompt], num_frames: int, resolution: int, frame_stride: int,
                     manifest: str | None, target_fps: float | None = None) -> tuple[np.ndarray | None, bool, dict]:
    """(real clips, paired, where they come from). Paired: the held-out ground truth or the prompts' own clips
    (dataset), clip i showing prompt i. Unpaired: the first clips of `manifest`, as many as there are prompts (for
    FVD / FID only). (None, False, {}) when there is no source. Clips are read as training reads them
    (data/dataset.py: window_range): the first window, every frame_stride-th frame, or with target_fps every
    round(fps / target_fps)-th, so real and generated videos have the same frame rate."""
    if all(p.render_seed is not None for p in prompts):
        clips = np.stack([render_reference(p, num_frames, resolution) for p in prompts])
        return clips, True, {"source": RENDERED, "manifest": None, "fps": None}
    from data.dataset import window_range
    from data.video import probe_video

    paired = all(p.reference for p in prompts)
    if paired:
        chosen, source = list(prompts), "the prompts' own clips"
    elif manifest:
        chosen = prompts_from_manifest(manifest, len(prompts))
        source = f"the first {len(chosen)} clips of the reference manifest"
    else:
        return None, False, {}
    clips, rates = [], set()
    for prompt in chosen:
        record = prompt.extra.get("record")
        if record is None:  # a reference without a manifest record: read from frame 0 (or its range) at frame_stride
            start = prompt.frame_range[0] if prompt.frame_range else 0
            stride, fps = frame_stride, None
        else:
            info = probe_video(record.video)
            starts, stride = window_range(record, info, num_frames, frame_stride, target_fps)
            start, fps = starts[0], record.fps or info.fps
        if fps:
            rates.add(round(fps / stride, 3))
        clips.append(read_frames(prompt.reference, [start + i * stride for i in range(num_frames)], resolution))
    manifests = sorted({p.extra["manifest"] for p in chosen if "manifest" in p.extra})
    return np.stack(clips), paired, {"source": source, "manifest": manifests[0] if len(manifests) == 1 else manifests
                                     or None, "fps": sorted(rates) or None}


def _rendered_frame_rate(real_info: dict, training_manifest: Path, data) -> None:
    """Held-out ground truth is rendered frame after frame on the FaceVid-Synth timeline (the training clips' fps),
    while training read every frame_stride-th frame (or every round(fps / target_fps)-th): record both rates, and
    whether they differ, so an FVD that mixes two frame rates says so."""
    synth_info = training_manifest.parent / "synth_info.json"
    fps = float(json.loads(synth_info.read_text())["fps"]) if synth_info.is_file() else None
    stride = data.frame_stride
    if data.target_fps and fps:
        stride = max(1, round(fps / data.target_fps))
    real_info.update(fps=[fps] if fps else None, same_frame_rate_as_training=stride == 1,
                     training_frame_stride=stride)


def frechet_protocol(metric: dict, extractor, real_info: dict, num_frames: int, resolution: int,
                     training_fps: float | None) -> dict:
    """Everything an FVD / FID depends on besides the model, recorded with the figure: sample sizes, clip length,
    frame rate, resolution, the real clips (source, manifest and its SHA-256) and the feature network's file and
    SHA-256. Two figures are comparable only when their protocols match."""
    manifest = real_info.get("manifest")
    real = {**real_info, "manifest_sha256": file_sha256(manifest) if isinstance(manifest, str) else None}
    protocol = {
        "num_generated_videos": metric["num_generated_videos"], "num_real_videos": metric["num_real_videos"],
        "frames_per_video": num_frames, "resolution": resolution, "real_fps": real.pop("fps"),
        "training_fps": training_fps, "real": real,
        "feature_extractor": {"file": extractor.file, "sha256": extractor.sha256},
    }
    if "comparable_to_published" in metric:
        protocol["published_sample_size"] = metric["published_sample_size"]
        protocol["comparable_to_published"] = metric["comparable_to_published"]
    return protocol


@torch.no_grad()
def vae_round_trip(pipeline, videos: np.ndarray) -> np.ndarray:
    """Real clips encoded and decoded by the run's VAE: the best any sample of this run can look."""
    from data.video import frames_to_tensor, tensor_to_frames
    from models.vae import decode_latents, encode_video_posterior

    out = []
    for start in range(0, len(videos), 8):
        clips = torch.stack([frames_to_tensor(v) for v in videos[start:start + 8]]).to(pipeline.device)
        mean, _ = encode_video_posterior(pipeline.vae, clips, pipeline.chunk_frames)
        decoded = decode_latents(pipeline.vae, mean * pipeline.vae.config.scaling_factor, pipeline.chunk_frames)
        out += [tensor_to_frames(v) for v in decoded.cpu()]
    return np.stack(out)


# ----------------------------------------------------------------------------- evaluate_run


def evaluate_run(run_dir: str | Path, *, pipeline=None, prompts: Sequence[EvalPrompt] | None = None,
                 config: EvaluationConfig | None = None, extractors: Extractors | None = None,
                 out_dir: str | Path | None = None, step: int | None = None, eval_set: str | None = None,
                 model_name: str | None = None, write: bool = True, device: str = "cpu") -> dict:
    """Evaluate a text-to-video run; returns the result written to OUT/metrics.json.

    run_dir: the run (its config.yaml names the training manifest, sampling defaults and weights).
    pipeline: an already-built FaceVidPipeline (e.g. the trainer's EMA weights); default: loaded
        from run_dir with FaceVidPipeline.from_run. It must carry `run_config` or run_dir must hold
        config.yaml.
    prompts: the prompt set; default: config.synth_heldout held-out FaceVid-Synth prompts against
        the run's training manifest.
    extractors: load_extractors(config), to reuse loaded networks across calls.
    out_dir: default RUN/eval/<eval set>[-step-N]. step: recorded, and part of the default out_dir.
    model_name: the table's Model column; default "<run name> (<weights>)".
    write: False = only return the result (no files).

    Uses no global random state (every generator is seeded locally), so calling it in the middle
    of training does not change the training run.
    """
    from evaluation.report import write_report
    from facevid.stages.common import training_fps

    config = config or EvaluationConfig()
    run_dir = Path(run_dir)
    extractors = load_extractors(config, extractors, device)  # first: a missing weight file fails fast
    if pipeline is None:
        from facevid.pipeline import FaceVidPipeline

        pipeline = FaceVidPipeline.from_run(run_dir, device=device)
    run_config = getattr(pipeline, "run_config", None)
    if run_config is None:
        from facevid.config import load_config

        run_config = load_config(run_dir / "config.yaml")
    training_manifest = Path(run_config.data.manifest)
    if prompts is None:
        seen = Path(config.train_manifest or training_manifest)
        if not seen.is_file():
            raise FileNotFoundError(f"held-out prompts need the training manifest to find unseen attribute "
                                    f"combinations: {seen} not found (--train-manifest / eval.train_manifest, "
                                    f"default the run's data.manifest)")
        prompts = heldout_prompts(config.synth_heldout, manifest_attributes(seen), config.heldout_seed)
        eval_set = eval_set or f"FaceVid-Synth held-out ({len(prompts)})"
    eval_set = eval_set or f"{len(prompts)} prompts"
    num_frames = config.num_frames or run_config.data.num_frames
    resolution = config.resolution or run_config.data.resolution

    timings, started = {}, time.time()
    generated = generate_videos(pipeline, [p.prompt for p in prompts], config, run_config)
    timings["generate_s"] = round(time.time() - started, 2)
    logger.info("evaluation: %d videos generated in %.1f s", len(generated), timings["generate_s"])
    needs_reference = {"fvd", "fid"} & set(config.metrics)
    real, paired, real_info = reference_videos(
        prompts, num_frames, resolution, run_config.data.frame_stride,
        config.reference_manifest or (str(training_manifest) if needs_reference else None), run_config.data.target_fps)
    if real_info:
        real_info["same_frame_rate_as_training"] = True  # clips read from files use the training windows
    if real_info.get("source") == RENDERED:
        _rendered_frame_rate(real_info, training_manifest, run_config.data)

    results: dict = {}
    for metric in config.metrics:
        started = time.time()
        if metric in ("fvd", "fid") and real is None:
            raise ValueError(f"{metric.upper()} needs real clips: these prompts have none; give a reference "
                             f"manifest (--reference / eval.reference_manifest)")
        if metric in ("fvd", "fid"):
            compute, extractor = {"fvd": (M.fvd, extractors.i3d), "fid": (M.fid, extractors.inception)}[metric]
            results[metric] = compute(extractor, real, generated)
            results[metric]["protocol"] = frechet_protocol(results[metric], extractor, real_info, num_frames,
                                                           resolution, run_config.data.target_fps)
        elif metric == "clip":
            results["clip"] = M.clip_scores(extractors.clip, generated, [p.prompt for p in prompts])
        elif metric == "alignment":
            results["alignment"] = _alignment(prompts, generated, real if paired else None, pipeline)
        timings[f"{metric}_s"] = round(time.time() - started, 2)

    result = {
        "model": model_name or f"{run_dir.name} ({getattr(pipeline, 'weights', 'unet')})",
        "run": str(run_dir), "step": step, "training_set": _training_set_name(training_manifest),
        "eval_set": eval_set,
        "generation": {"num_videos": len(prompts), "num_frames": num_frames, "resolution": resolution,
                       "seed": config.seed, "steps": config.steps or run_config.sample.num_inference_steps,
                       "guidance_scale": config.guidance_scale or run_config.sample.guidance_scale,
                       "scheduler": config.scheduler or run_config.sample.scheduler,
                       "fps": training_fps(run_config)},  # what saved videos play at: sample.py's default
        "metrics": results, "timing": timings, "config": asdict(config),
    }
    if write:
        out_dir = Path(out_dir) if out_dir else run_dir / "eval" / (_slug(eval_set) + (f"-step-{step}" if step else ""))
        result["files"] = write_report(result, out_dir, prompts, generated, real, config, paired)
    return result


def _alignment(prompts: Sequence[EvalPrompt], generated, real, pipeline) -> dict:
    """Alignment of the generated videos, plus two references on the same prompts when real clips
    with known attributes exist: the real clips themselves (the probe's own accuracy) and the real
    clips through the run's VAE (the best a sample from this run can reach)."""
    keep = [i for i, p in enumerate(prompts) if p.attributes]
    if not keep:
        raise ValueError("alignment needs prompts with FaceVid-Synth attributes (held-out set, a manifest with "
                         "attributes, or captions that state all nine attributes)")
    targets = [prompts[i].attributes for i in keep]
    groups = [prompts[i].group for i in keep]
    out = M.alignment(generated[keep], targets, groups)
    predictions = [None] * len(prompts)  # per prompt, None where it states no attributes
    for i, prediction in zip(keep, out["predictions"]):
        predictions[i] = prediction
    out["predictions"] = predictions
    out["num_prompts_without_attributes"] = len(prompts) - len(keep)
    if real is not None:
        out["reference_real"] = _without_predictions(M.alignment(real[keep], targets))
        out["reference_vae"] = _without_predictions(M.alignment(vae_round_trip(pipeline, real[keep]), targets))
    return out


def _without_predictions(result: dict) -> dict:
    result.pop("predictions", None)
    return result


def _training_set_name(manifest: Path) -> str:
    try:
        count = sum(1 for line in manifest.read_text().splitlines() if line.strip())
        return f"{manifest.parent.name} ({count} clips)"
    except OSError:
        return manifest.parent.name


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:60] or "eval"


def flat_metrics(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """The headline numbers of a result, for a tracker / metrics.jsonl row."""
    m = result["metrics"]
    flat = {}
    for key, value in (("fvd", m.get("fvd", {}).get("value")), ("fid", m.get("fid", {}).get("value")),
                       ("clip_score", m.get("clip", {}).get("clip_score")),
                       ("frame_consistency", m.get("clip", {}).get("frame_consistency")),
                       ("attribute_accuracy", m.get("alignment", {}).get("mean_accuracy")),
                       ("exact_match", m.get("alignment", {}).get("exact_match"))):
        if value is not None:
            flat[prefix + key] = float(value)
    return flat


def load_result(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
