"""CelebV-HQ and CelebV-Text: an info JSON of clips cut from YouTube videos, plus labels or texts.

Both releases describe each clip by its source (``ytb_id``), time range in that source
(``duration.start_sec/end_sec``) and face box (``bbox``: normalised 0-1 in CelebV-HQ, pixels in
CelebV-Text). Their download scripts save either the raw source video (``<ytb_id>.mp4``) or the
processed clip, already trimmed and cropped (``<clip_id>.mp4``). So the time range only applies to a
raw source video: for a processed clip it is kept as ``source_time_range`` (and the box as
``source_bbox``) in the record, since seeking to it inside the short clip would land past its end.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from data.adapters.common import (
    AdapterResult,
    AnnotationError,
    VideoIndex,
    VideoMissing,
    load_json,
    read_text_lines,
    snake_key,
)
from data.manifest import ClipRecord

VIDEO_MODES = ("auto", "clips", "raw")


# ----------------------------------------------------------------------------- shared geometry


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(f"{what} must be a number, got {value!r}")
    return float(value)


def parse_time_range(clip: dict) -> tuple[float, float] | None:
    duration = clip.get("duration")
    if duration is None:
        return None
    if not isinstance(duration, dict):
        raise AnnotationError(f"'duration' must be an object with start_sec/end_sec, got {duration!r}")
    start = _number(duration.get("start_sec"), "duration.start_sec")
    end = _number(duration.get("end_sec"), "duration.end_sec")
    if not end > start >= 0:
        raise AnnotationError(f"'duration' must satisfy 0 <= start_sec < end_sec, got {start}..{end}")
    return (start, end)


def parse_bbox(clip: dict, normalised: bool) -> dict | None:
    bbox = clip.get("bbox")
    if bbox is None:
        return None
    if not isinstance(bbox, dict):
        raise AnnotationError(f"'bbox' must be an object with top/bottom/left/right, got {bbox!r}")
    box = {side: _number(bbox.get(side), f"bbox.{side}") for side in ("top", "bottom", "left", "right")}
    if not (box["bottom"] > box["top"] and box["right"] > box["left"]):
        raise AnnotationError(f"'bbox' is empty or inverted: {box}")
    if normalised and not all(0.0 <= v <= 1.0 for v in box.values()):
        raise AnnotationError(f"'bbox' must be normalised to 0-1, got {box}")
    return box | {"unit": "normalised" if normalised else "pixels"}


def locate_clip(clip_id: str, clip: dict, videos: VideoIndex, mode: str, normalised_bbox: bool) -> dict:
    """Video path, time range and geometry fields of a record, depending on which file is on disk."""
    time_range = parse_time_range(clip)
    bbox = parse_bbox(clip, normalised_bbox)
    ytb_id = clip.get("ytb_id")
    processed = videos.find(clip_id) if mode in ("auto", "clips") else None
    if processed is not None:
        extra = {"source_time_range": list(time_range) if time_range else None, "source_bbox": bbox,
                 "ytb_id": ytb_id}
        return {"video": processed, "time_range": None, "extra": extra}
    raw = videos.find(str(ytb_id)) if ytb_id and mode in ("auto", "raw") else None
    if raw is not None:
        return {"video": raw, "time_range": time_range, "extra": {"bbox": bbox, "ytb_id": ytb_id}}
    looked_for = {"auto": f"{clip_id}.* or {ytb_id}.*", "clips": f"{clip_id}.*", "raw": f"{ytb_id}.*"}[mode]
    raise VideoMissing(f"no video {looked_for} under {videos.root}")


def clips_of(info) -> dict:
    """The clip table of an info JSON: ``{"clips": {...}}`` or the table itself."""
    if not isinstance(info, dict):
        raise AnnotationError(f"expected a JSON object, got {type(info).__name__}")
    clips = info.get("clips", info)
    if not isinstance(clips, dict):
        raise AnnotationError("'clips' must be an object keyed by clip id")
    return clips


def _check_clip(clip) -> None:
    if not isinstance(clip, dict):
        raise AnnotationError(f"expected an object per clip, got {type(clip).__name__}")


@contextmanager
def _reported(result: AdapterResult, source: str):
    """Reading one clip: a bad annotation is listed as an error, a missing video as missing (both against
    `source`), and the reader goes on to the next clip."""
    try:
        yield
    except AnnotationError as err:
        result.error(source, str(err))
    except VideoMissing as err:
        result.miss(source, str(err))


# ----------------------------------------------------------------------------- CelebV-HQ captions


def gerund(verb_phrase: str) -> str:
    """'talk' -> 'talking', 'shake_head' -> 'shaking head', 'nod' -> 'nodding', 'head_wagging' kept."""
    words = verb_phrase.replace("_", " ").split()
    if not words or any(w.endswith("ing") for w in words):
        return " ".join(words)
    verb = words[0]
    if verb.endswith("e") and not verb.endswith("ee"):
        verb = verb[:-1] + "ing"
    elif re.fullmatch(r"[^aeiou]*[aeiou][bdgmnpt]", verb):  # one-syllable consonant-vowel-consonant
        verb = verb + verb[-1] + "ing"
    else:
        verb += "ing"
    return " ".join([verb, *words[1:]])


HAIR_ORDER = ("long", "short", "straight", "wavy", "curly")  # then the colour
APPEARANCE_WORDING = {
    "blonde_hair": "blond hair", "5_o_clock_shadow": "a five o'clock shadow", "heavy_makeup": "heavy makeup",
    "bags_under_eyes": "bags under the eyes", "receding_hairline": "a receding hairline",
}
SUBJECT_ADJECTIVES = ("young", "chubby", "bald", "attractive")
WORN = ("eyeglasses", "sunglasses", "heavy_makeup")
# Image quality, not appearance: a caption saying "blurry" would teach the model to produce blur.
NOT_IN_CAPTION = ("blurry",)


def celebvhq_caption(appearance: list[str], actions: list[str], emotions: list[str],
                     has_gender_label: bool) -> str:
    """FaceVid-1K style: 'a young woman with long wavy blond hair, wearing eyeglasses, smiling,
    talking, happy expression'."""
    names = [n for n in appearance if n not in NOT_IN_CAPTION]
    noun = ("man" if "male" in names else "woman") if has_gender_label else "person"
    adjectives = [n for n in SUBJECT_ADJECTIVES if n in names]
    subject = " ".join(["a", *adjectives, noun]).replace("a attractive", "an attractive")

    hair_words = [n[: -len("_hair")] for n in names if n.endswith("_hair")]
    ordered_hair = [w for w in HAIR_ORDER if w in hair_words] + [w for w in hair_words if w not in HAIR_ORDER]
    features = []
    if ordered_hair:
        features.append(" ".join("blond" if w == "blonde" else w for w in ordered_hair) + " hair")
    worn = []
    for name in names:
        if name in ("male", *SUBJECT_ADJECTIVES) or name.endswith("_hair"):
            continue
        wording = APPEARANCE_WORDING.get(name, name.replace("_", " "))
        if name.startswith("wearing_"):
            worn.append(wording[len("wearing "):])
        elif name in WORN:
            worn.append(wording)
        else:
            features.append(wording)

    parts = [subject + (" with " + ", ".join(features) if features else "")]
    parts += ["wearing " + w for w in worn]
    parts += [gerund(a) for a in actions]
    if emotions:
        parts.append(", then ".join(emotions) + " expression")
    return ", ".join(parts)


def _multi_hot(values, mapping: list[str], what: str) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, list) or len(values) != len(mapping):
        raise AnnotationError(f"'attributes.{what}' must be a list of {len(mapping)} 0/1 flags "
                              f"(one per {what}_mapping name), got {values!r}")
    return [name for name, flag in zip(mapping, values) if flag]


def _emotions(emotion) -> tuple[list[str], list[dict] | None]:
    """Distinct emotions in order of appearance, and the timed segments when the clip has several."""
    if emotion is None:
        return [], None
    if not isinstance(emotion, dict):
        raise AnnotationError(f"'attributes.emotion' must be an object, got {emotion!r}")
    labels = emotion.get("labels")
    if isinstance(labels, str):
        return [labels], None
    if not isinstance(labels, list) or not all(isinstance(s, dict) and "emotion" in s for s in labels):
        raise AnnotationError(f"'attributes.emotion.labels' must be a string or a list of "
                              f"{{sttime, edtime, emotion}}, got {labels!r}")
    ordered = list(dict.fromkeys(str(s["emotion"]) for s in labels))
    return ordered, labels


def adapt_celebvhq(root: Path, info_path: Path | None = None, videos_mode: str = "auto") -> AdapterResult:
    info_path = info_path or root / "celebvhq_info.json"
    result = AdapterResult()
    try:
        info = load_json(info_path)
        clips = clips_of(info)
        meta = info.get("meta_info") or {}
        appearance_names = list(meta.get("appearance_mapping") or [])
        action_names = list(meta.get("action_mapping") or [])
    except (AnnotationError, OSError) as err:
        result.error(str(info_path), str(err))
        return result
    if not appearance_names or not action_names:
        result.notes.append("meta_info lacks appearance_mapping or action_mapping: those labels are not used")
    videos = VideoIndex(root)
    for clip_id, clip in clips.items():
        with _reported(result, f"{info_path}:{clip_id}"):
            _check_clip(clip)
            labels = clip.get("attributes") or {}
            appearance = _multi_hot(labels.get("appearance"), appearance_names, "appearance") \
                if appearance_names else []
            actions = _multi_hot(labels.get("action"), action_names, "action") if action_names else []
            emotions, segments = _emotions(labels.get("emotion"))
            caption = celebvhq_caption(appearance, actions, emotions, "male" in appearance_names)
            placed = locate_clip(str(clip_id), clip, videos, videos_mode, normalised_bbox=True)
            attributes = {"appearance": appearance, "action": actions,
                          "emotion": emotions[0] if len(emotions) == 1 else emotions}
            extra = placed["extra"] | {"source": "celebvhq"}
            if segments:
                extra["emotion_segments"] = segments
            result.add(ClipRecord(clip_id=str(clip_id), video=str(placed["video"].resolve()), captions=[caption],
                                  attributes=attributes, time_range=placed["time_range"], extra=extra))
    return result


# ----------------------------------------------------------------------------- CelebV-Text


def _text_files(texts_dir: Path) -> dict[str, dict[str, Path]]:
    """{clip_id: {kind: path}} where kind is the text folder (face40_details_new, action_dur ...)."""
    by_clip: dict[str, dict[str, Path]] = {}
    for kind_dir in sorted(p for p in texts_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder, dirs, files in os.walk(kind_dir):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".txt"):
                    by_clip.setdefault(name[:-4], {})[snake_key(kind_dir.name)] = Path(folder, name)
    return by_clip


def adapt_celebvtext(root: Path, info_path: Path | None = None, texts_dir: Path | None = None,
                     videos_mode: str = "auto") -> AdapterResult:
    result = AdapterResult()
    if info_path is None:
        candidates = sorted(root.glob("*info*.json"))
        info_path = candidates[0] if candidates else root / "celebvtext_info.json"
    texts_dir = texts_dir or root / "texts"
    clips: dict = {}
    if info_path.is_file():
        try:
            clips = clips_of(load_json(info_path))
        except AnnotationError as err:
            result.error(str(info_path), str(err))
    else:
        result.notes.append(f"no info JSON ({info_path}): clips come from the text files alone, "
                            "without time range or box")
    if not texts_dir.is_dir():
        result.error(str(texts_dir), "texts folder not found (expected texts/<attribute>/<clip_id>.txt)")
        return result
    texts = _text_files(texts_dir)
    only_texts = [c for c in texts if c not in clips]
    if clips and only_texts:
        result.notes.append(f"{len(only_texts)} clips have texts but no info entry: kept without time range "
                            f"or box (e.g. {only_texts[0]})")
    videos = VideoIndex(root)
    for clip_id in list(clips) + only_texts:
        clip = clips.get(clip_id, {})
        source = f"{info_path}:{clip_id}" if clip_id in clips else str(texts_dir / "*" / f"{clip_id}.txt")
        with _reported(result, source):
            _check_clip(clip)
            captions, kinds = [], []
            for kind, path in texts.get(clip_id, {}).items():
                lines = read_text_lines(path)
                captions += lines
                kinds += [kind] * len(lines)
            if not captions:
                raise AnnotationError(f"no text for this clip under {texts_dir}")
            placed = locate_clip(clip_id, clip, videos, videos_mode, normalised_bbox=False)
            extra = placed["extra"] | {"source": "celebvtext", "caption_kinds": kinds}
            result.add(ClipRecord(clip_id=clip_id, video=str(placed["video"].resolve()), captions=captions,
                                  time_range=placed["time_range"], extra=extra))
    return result
