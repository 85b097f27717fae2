"""The metrics: FVD, FID, CLIP score and frame consistency, attribute alignment. Each returns a dict
with its value(s) and how many videos / frames it used."""

from __future__ import annotations

import numpy as np

from data import synth
from evaluation.features import ClipFeatures, I3DFeatures, InceptionFeatures
from evaluation.frechet import frechet_distance_of_features
from evaluation.probe import probe_attributes


def _check_videos(videos, what: str) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 videos (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
    return videos


# Videos per side behind published FVDs (StyleGAN-V, content-debiased FVD, the FaceVid-1K tables). The Frechet
# distance of a small sample is biased upward (the covariances of a few videos are far from the population's), so
# an FVD over fewer videos is not comparable with those figures, only with FVDs of the same sample size.
PUBLISHED_FVD_SAMPLES = 2048


def fvd_sample_note(num_real: int, num_generated: int) -> tuple[str, bool]:
    """("n=..." plus a warning below the published sample size, whether comparable to published figures)."""
    n = min(num_real, num_generated)
    comparable = n >= PUBLISHED_FVD_SAMPLES
    return (f"n={n}" if comparable else f"n={n}, not comparable to published"), comparable


def fvd(i3d: I3DFeatures, real, generated) -> dict:
    """Frechet distance between I3D features of real and generated videos (FVD), labelled with its sample size."""
    real, generated = _check_videos(real, "real"), _check_videos(generated, "generated")
    note, comparable = fvd_sample_note(len(real), len(generated))
    return {
        "value": frechet_distance_of_features(i3d(real), i3d(generated)),
        "num_real_videos": len(real), "num_generated_videos": len(generated),
        "frames_per_video": int(generated.shape[1]),
        "frames_fed_to_i3d": i3d.frames_used(int(generated.shape[1])),
        "label": f"FVD ({note})", "comparable_to_published": comparable, "published_sample_size": PUBLISHED_FVD_SAMPLES,
    }


def fid(inception: InceptionFeatures, real, generated) -> dict:
    """Frechet distance between Inception features of all real and all generated frames (FID)."""
    real, generated = _check_videos(real, "real"), _check_videos(generated, "generated")
    return {
        "value": frechet_distance_of_features(inception(real.reshape(-1, *real.shape[2:])),
                                              inception(generated.reshape(-1, *generated.shape[2:]))),
        "num_real_videos": len(real), "num_real_frames": int(real.shape[0] * real.shape[1]),
        "num_generated_videos": len(generated), "num_generated_frames": int(generated.shape[0] * generated.shape[1]),
    }


def clip_scores(clip: ClipFeatures, generated, prompts: list[str]) -> dict:
    """CLIP score: 100 x cosine(prompt, frame), averaged over frames, then over videos (no clipping
    at 0). Frame consistency: 100 x cosine(frame t, first frame) over t >= 1, averaged likewise."""
    generated = _check_videos(generated, "generated")
    if len(prompts) != len(generated):
        raise ValueError(f"{len(prompts)} prompts for {len(generated)} videos")
    num_videos, num_frames = generated.shape[:2]
    frames = clip.images(generated.reshape(-1, *generated.shape[2:])).reshape(num_videos, num_frames, -1)
    text = clip.text(prompts)
    per_video = np.einsum("vfd,vd->vf", frames, text).mean(1) * 100
    consistency = np.einsum("vfd,vd->vf", frames[:, 1:], frames[:, 0]).mean(1) * 100 if num_frames > 1 else None
    return {
        "clip_score": float(per_video.mean()),
        "frame_consistency": float(consistency.mean()) if consistency is not None else None,
        "num_videos": int(num_videos), "frames_per_video": int(num_frames), "model": clip.name,
    }


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform guess: FaceVid-Synth draws every value uniformly."""
    return {name: 1.0 / len(values) for name, values in synth.ATTRIBUTES.items()}


def alignment(videos, targets: list[dict[str, str]], groups: list[str | None] | None = None) -> dict:
    """How often the probe reads back each prompted attribute from the video.

    Per attribute: accuracy and chance level; overall: the mean of the per-attribute accuracies and
    the exact-match rate (all nine attributes right). With `groups` (e.g. novel / familiar held-out
    prompts) the same again per group."""
    videos = _check_videos(videos, "videos")
    if len(targets) != len(videos):
        raise ValueError(f"{len(targets)} attribute sets for {len(videos)} videos")
    predictions = [probe_attributes(v) for v in videos]
    prompted_actions = [t["action"] for t in targets]
    result = {**_alignment_summary(predictions, targets), "frames_per_video": int(videos.shape[1]),
              "frame_change": frame_change(videos, prompted_actions),
              "action_confusion": action_confusion(prompted_actions, [p["action"] for p in predictions])}
    if groups is not None and any(g is not None for g in groups):
        result["groups"] = {
            g: _alignment_summary([p for p, gg in zip(predictions, groups) if gg == g],
                                  [t for t, gg in zip(targets, groups) if gg == g])
            for g in sorted({g for g in groups if g is not None})}
    result["predictions"] = predictions
    return result


def frame_change(videos, actions: list[str]) -> dict:
    """How much the frames move: mean |frame t+1 - frame t| in grey levels (0-255), over all videos and per
    prompted action. The probe reads the action from motion, so a sample that shimmers where its prompt
    says "still" shows up here before it does in the accuracy."""
    videos = _check_videos(videos, "videos").astype(np.float32)
    if videos.shape[1] < 2:
        return {"mean": None, "by_action": {}}
    per_video = np.abs(np.diff(videos, axis=1)).mean(axis=(1, 2, 3, 4))
    by_action = {a: float(per_video[[x == a for x in actions]].mean()) for a in synth.ATTRIBUTES["action"]
                 if a in actions}
    return {"mean": float(per_video.mean()), "by_action": by_action}


def action_confusion(prompted: list[str], read: list[str]) -> dict[str, dict[str, int]]:
    """{prompted action: {action the probe read: count}}: whether "talking" samples move their mouth and
    "still" ones hold still shows here, where the accuracy alone mixes it with the other actions."""
    actions = synth.ATTRIBUTES["action"]
    return {a: {b: sum(p == a and r == b for p, r in zip(prompted, read)) for b in actions}
            for a in actions if a in prompted}


def _alignment_summary(predictions: list[dict], targets: list[dict]) -> dict:
    chance = chance_levels()
    per_attribute = {
        name: {"accuracy": float(np.mean([p[name] == t[name] for p, t in zip(predictions, targets)])),
               "chance": chance[name]}
        for name in synth.ATTRIBUTES}
    return {
        "per_attribute": per_attribute,
        "mean_accuracy": float(np.mean([v["accuracy"] for v in per_attribute.values()])),
        "mean_chance": float(np.mean(list(chance.values()))),
        "exact_match": float(np.mean([p == t for p, t in zip(predictions, targets)])),
        "exact_match_chance": float(np.prod(list(chance.values()))),
        "num_videos": len(targets),
    }
