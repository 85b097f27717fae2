"""Evaluation prompt sets: FaceVid-Synth held-out prompts, prompt files, dataset manifests.

Held-out FaceVid-Synth prompts come from their own seed space: clip i of a training set generated
with `seed` is drawn from ``default_rng([seed, i])`` (data/synth.py), held-out prompt i from
``default_rng([seed, i, HELDOUT_TAG])``, a different stream for every (seed, i). Half of them are
*novel*: they contain a combination of attribute values that never occurs together in the
training manifest (the smallest such combinations: pairs if some pair never occurs, else triples,
...); the other half are *familiar*: every combination of that size in them occurs in training.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import synth
from data.manifest import read_manifest

HELDOUT_TAG = 0x45564C  # "EVL": the third word of a held-out prompt's seed, never used by training clips


@dataclass
class EvalPrompt:
    prompt: str
    attributes: dict[str, str] | None = None  # FaceVid-Synth attributes, when known
    render_seed: int | None = None  # held-out FaceVid-Synth: render_clip seed of the ground-truth clip
    group: str | None = None  # held-out: "novel" or "familiar"
    novel_combination: dict[str, str] | None = None  # held-out novel: the values never seen together
    reference: str | None = None  # dataset: the real clip's video file
    frame_range: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)


def is_synth_attributes(attributes: dict | None) -> bool:
    return bool(attributes) and all(attributes.get(k) in v for k, v in synth.ATTRIBUTES.items())


# ----------------------------------------------------------------------------- held-out set


def _combination_index(training_attributes: list[dict[str, str]]):
    """(size, unseen combinations) for the smallest size at which some combination of values never
    occurs in training; each combination a tuple of (attribute, value) pairs."""
    names = list(synth.ATTRIBUTES)
    for size in range(2, len(names) + 1):
        unseen = []
        for subset in itertools.combinations(names, size):
            seen = {tuple(a[n] for n in subset) for a in training_attributes}
            unseen += [tuple(zip(subset, values)) for values in itertools.product(*(synth.ATTRIBUTES[n] for n in subset))
                       if values not in seen]
        if unseen:
            return size, unseen
    raise ValueError("every attribute combination occurs in the training manifest: no novel prompt possible")


def _contains_unseen(attributes: dict[str, str], size: int, unseen: set) -> bool:
    return any(tuple((n, attributes[n]) for n in subset) in unseen
               for subset in itertools.combinations(synth.ATTRIBUTES, size))


def heldout_prompts(count: int, training_attributes: list[dict[str, str]], seed: int = 0) -> list[EvalPrompt]:
    """`count` FaceVid-Synth prompts with their attributes and ground-truth render seeds, none drawn
    from a training seed; the odd-numbered half novel, the even-numbered half familiar (see module doc).
    Deterministic in (count, training_attributes, seed)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    training_attributes = [a for a in training_attributes if is_synth_attributes(a)]
    if not training_attributes:
        raise ValueError("the training manifest has no FaceVid-Synth attributes to tell novel combinations from")
    size, unseen_list = _combination_index(training_attributes)
    unseen = set(unseen_list)
    prompts = []
    for i in range(count):
        rng = np.random.default_rng([seed, i, HELDOUT_TAG])
        if i % 2:  # novel: one unseen combination, the rest drawn uniformly
            combination = dict(unseen_list[rng.integers(len(unseen_list))])
            attributes = {**synth.sample_attributes(rng), **combination}
            attributes = {name: attributes[name] for name in synth.ATTRIBUTES}
        else:  # familiar: drawn uniformly until every combination of that size occurs in training
            combination = None
            for _ in range(1000):
                attributes = synth.sample_attributes(rng)
                if not _contains_unseen(attributes, size, unseen):
                    break
        prompts.append(EvalPrompt(
            prompt=synth.caption_for(attributes, rng), attributes=attributes,
            render_seed=int(rng.integers(2**63)), group="novel" if i % 2 else "familiar",
            novel_combination=combination, extra={"combination_size": size}))
    return prompts


def render_reference(prompt: EvalPrompt, num_frames: int, resolution: int) -> np.ndarray:
    """The held-out prompt's ground-truth clip, uint8 (T, H, W, 3)."""
    return synth.render_clip(prompt.attributes, num_frames, resolution, prompt.render_seed)


# ----------------------------------------------------------------------------- captions


def _phrase_table() -> dict[str, list[tuple[str, str]]]:
    """attribute -> [(regex, value)], longest phrase first, so that "without glasses" wins over "glasses"."""
    table = {
        "skin_tone": [(rf"\b{v}(?: |-)skin", v) for v in synth.ATTRIBUTES["skin_tone"]],
        "hair_color": [(rf"\b(?:short|long) {v} hair", v) for v in synth.ATTRIBUTES["hair_color"]],
        "hair_length": [(rf"\b{v} (?:{'|'.join(synth.ATTRIBUTES['hair_color'])}) hair", v)
                        for v in synth.ATTRIBUTES["hair_length"]],
        "lighting": [(rf"\b{v} light", v) for v in synth.ATTRIBUTES["lighting"]],
    }
    for name, values in synth.PHRASES.items():
        pairs = [(phrase, value) for value, phrases in values.items() for phrase in phrases]
        table[name] = [(rf"\b{re.escape(p)}\b", v) for p, v in sorted(pairs, key=lambda pv: -len(pv[0]))]
    return table


_PHRASES = _phrase_table()


def parse_caption(text: str) -> dict[str, str] | None:
    """FaceVid-Synth attributes stated by a caption written like synth.caption_for's, or None when
    some attribute is not stated."""
    text = text.lower()
    attributes = {}
    for name, patterns in _PHRASES.items():
        value = next((v for pattern, v in patterns if re.search(pattern, text)), None)
        if value is None:
            return None
        attributes[name] = value
    return {name: attributes[name] for name in synth.ATTRIBUTES}


# ----------------------------------------------------------------------------- other sources


def prompts_from_file(path: str | Path) -> list[EvalPrompt]:
    """One prompt per non-empty line; FaceVid-Synth attributes parsed from it where it states all."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompt")
    return [EvalPrompt(line, attributes=parse_caption(line)) for line in lines]


def prompts_from_manifest(path: str | Path, limit: int | None = None) -> list[EvalPrompt]:
    """The first `limit` clips of a manifest: first caption as the prompt, the clip as the reference,
    attributes from the manifest (or parsed from the caption)."""
    records, _ = read_manifest(path)
    if not records:
        raise ValueError(f"{path} holds no usable clip")
    prompts = []
    for record in records[:limit]:
        caption = record.captions[0]
        attributes = record.attributes if is_synth_attributes(record.attributes) else parse_caption(caption)
        # The record itself: its clip is read for FVD / FID with the training windows' frame stride.
        prompts.append(EvalPrompt(caption, attributes=attributes, reference=str(record.video),
                                  frame_range=tuple(record.frame_range) if record.frame_range else None,
                                  extra={"clip_id": record.clip_id, "record": record, "manifest": str(path)}))
    return prompts


def manifest_attributes(path: str | Path) -> list[dict[str, str]]:
    records, _ = read_manifest(path)
    return [dict(r.attributes) for r in records if r.attributes]
