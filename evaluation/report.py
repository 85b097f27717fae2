"""metrics.json, a Markdown results table shaped like FaceVid-1K's (one row per model x training
set), and the generated-vs-real contact sheet.

Merge several evaluations into one table:

    python -m evaluation.report runs/*/eval/*/metrics.json --out results.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from data import synth
from data.video import write_video
from evaluation.metrics import fvd_sample_note
from evaluation.plots import comparison_sheet

_COLUMNS = ["Model", "Training set", "Eval set", "Videos", "FVD ↓", "FID ↓", "CLIP score ↑", "Frame consistency ↑",
            "Attribute acc. ↑", "Exact match ↑"]
# The alignment blocks measured on real clips, beside the generated videos' own: (key in the result, column label).
_REFERENCES = (("reference_real", "real clips"), ("reference_vae", "real via VAE"))


def _number(value, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table_row(result: dict) -> list[str]:
    m = result["metrics"]
    clip, align = m.get("clip", {}), m.get("alignment", {})
    model = result["model"] + (f", step {result['step']}" if result.get("step") else "")
    accuracy = _percent(align.get("mean_accuracy"))
    if align:
        accuracy += f" ({_percent(align['mean_chance'])})"
    return [model, result["training_set"], result["eval_set"], str(result["generation"]["num_videos"]),
            _fvd_cell(m.get("fvd")), _number(m.get("fid", {}).get("value")),
            _number(clip.get("clip_score"), 2), _number(clip.get("frame_consistency"), 2), accuracy,
            _percent(align.get("exact_match"))]


def _fvd_cell(fvd: dict | None) -> str:
    """The value with its sample size, flagged when too small to compare with published FVDs."""
    if not fvd or fvd.get("value") is None:
        return "–"
    if "num_real_videos" not in fvd:
        return _number(fvd["value"])
    note, _ = fvd_sample_note(fvd["num_real_videos"], fvd["num_generated_videos"])  # also for older metrics.json
    return f"{_number(fvd['value'])} ({note})"


def _short_sha(sha: str | None) -> str:
    return f"sha256 {sha[:12]}…" if sha else "sha256 unknown"


def protocol_note(name: str, protocol: dict) -> str:
    """One line: what a Frechet distance was computed on, so it can be reproduced or compared."""
    p, real = protocol, protocol["real"]
    rate = "frame rate not known (rendered frames)" if p["real_fps"] is None else \
        f"real clips at {', '.join(f'{r:g}' for r in p['real_fps'])} fps"
    trained = f"data.target_fps {p['training_fps']:g}" if p.get("training_fps") else "source fps / data.frame_stride"
    manifest = real.get("manifest")
    where = f"{real['source']}" + (f", {manifest} ({_short_sha(real.get('manifest_sha256'))})"
                                   if isinstance(manifest, str) else "")
    line = (f"{name} protocol: {p['num_generated_videos']} generated vs {p['num_real_videos']} real videos, "
            f"{p['frames_per_video']} frames at {p['resolution']} px, {rate} (training: {trained}); real: {where}; "
            f"features: {Path(p['feature_extractor']['file']).name} ({_short_sha(p['feature_extractor']['sha256'])}).")
    if real.get("same_frame_rate_as_training") is False:
        line += (f" The real clips are consecutive frames, the model was trained on one frame in "
                 f"{real['training_frame_stride']}: real and generated videos differ in frame rate.")
    if p.get("comparable_to_published") is False:
        line += (f" Fewer than {p['published_sample_size']:,} videos: small-sample FVD is biased upward, so this "
                 f"figure is comparable only with FVDs of the same protocol, not with published ones.")
    return line


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(results: list[dict]) -> str:
    """One row per evaluation (model x training set x eval set)."""
    return _markdown(_COLUMNS, [table_row(r) for r in results])


def attribute_table(alignment: dict) -> str:
    """Per-attribute accuracy: generated videos (all, and per held-out group) next to the chance
    level and the two references (real clips; real clips through the run's VAE)."""
    groups = alignment.get("groups", {})
    references = [(k, label) for k, label in _REFERENCES if k in alignment]
    header = ["Attribute", "Chance", "Generated"] + [f"Generated, {g}" for g in groups] + [r[1] for r in references]
    rows = []
    for name in list(synth.ATTRIBUTES) + ["mean", "exact match"]:
        def pick(block, name=name):
            if name == "mean":
                return block["mean_accuracy"]
            if name == "exact match":
                return block["exact_match"]
            return block["per_attribute"][name]["accuracy"]
        chance = {"mean": alignment["mean_chance"], "exact match": alignment["exact_match_chance"]}.get(
            name, alignment["per_attribute"].get(name, {}).get("chance"))
        chance_text = f"{100 * chance:.3f}%" if name == "exact match" else _percent(chance)
        rows.append([name, chance_text, _percent(pick(alignment))] + [_percent(pick(groups[g])) for g in groups]
                    + [_percent(pick(alignment[k])) for k, _ in references])
    return _markdown(header, rows)


def motion_table(alignment: dict) -> str:
    """Mean |frame t+1 - frame t| of the generated videos next to the real references, per prompted action."""
    blocks = [("Generated", alignment)] + [(label, alignment[k]) for k, label in _REFERENCES if k in alignment]
    actions = list(alignment["frame_change"]["by_action"])
    rows = [[a] + [f"{b['frame_change']['by_action'][a]:.2f}" for _, b in blocks] for a in actions]
    rows.append(["all"] + [f"{b['frame_change']['mean']:.2f}" for _, b in blocks])
    return _markdown(["Prompted action"] + [label for label, _ in blocks], rows)


def confusion_table(alignment: dict) -> str:
    """Prompted action (rows) against the action the probe read from the generated video (columns)."""
    confusion = alignment["action_confusion"]
    actions = list(synth.ATTRIBUTES["action"])
    rows = [[a] + [str(counts[b]) for b in actions] for a, counts in confusion.items()]
    return _markdown(["Prompted \\ read"] + actions, rows)


def notes(result: dict) -> list[str]:
    """What each number was computed on."""
    m, g = result["metrics"], result["generation"]
    played = f" played at {g['fps']:g} fps" if g.get("fps") else ""
    out = [f"Generation: {g['num_videos']} videos of {g['num_frames']} frames at {g['resolution']} px{played}, "
           f"{g['scheduler']} {g['steps']} steps, guidance {g['guidance_scale']}, seeds {g['seed']}.."
           f"{g['seed'] + g['num_videos'] - 1}."]
    if "fvd" in m:
        f = m["fvd"]
        out += _frechet_notes("FVD", f, f"I3D features of {f['num_real_videos']} real and {f['num_generated_videos']} "
                                        f"generated videos ({f['frames_per_video']} frames, fed to I3D as "
                                        f"{f['frames_fed_to_i3d']})")
    if "fid" in m:
        f = m["fid"]
        out += _frechet_notes("FID", f, f"Inception features of {f['num_real_frames']} real frames "
                                        f"({f['num_real_videos']} videos) and {f['num_generated_frames']} generated "
                                        f"frames ({f['num_generated_videos']} videos)")
    if "clip" in m:
        c = m["clip"]
        out.append(f"CLIP score: 100 x cosine(prompt, frame), mean over {c['frames_per_video']} frames x "
                   f"{c['num_videos']} videos; frame consistency: 100 x cosine(frame, first frame); model {c['model']}.")
    if "alignment" in m:
        a = m["alignment"]
        out.append(f"Alignment: the FaceVid-Synth probe's reading of {a['num_videos']} videos against their prompts' "
                   f"attributes; attribute acc. = mean over the 9 attributes (chance in brackets), exact match = all 9 "
                   f"right.")
    return out


def _frechet_notes(name: str, metric: dict, features: str) -> list[str]:
    """What a Frechet distance was computed on: its features, then its protocol when the result records one."""
    return [f"{name}: {features}."] + ([protocol_note(name, metric["protocol"])] if "protocol" in metric else [])


def markdown_report(result: dict) -> str:
    parts = [f"# Evaluation: {result['model']} on {result['eval_set']}", "", results_table([result]), ""]
    if "alignment" in result["metrics"]:
        alignment = result["metrics"]["alignment"]
        parts += ["## Attribute alignment", "", attribute_table(alignment), ""]
        if alignment.get("frame_change", {}).get("mean") is not None:
            parts += ["## Frame-to-frame change (grey levels) by prompted action", "", motion_table(alignment), ""]
        if alignment.get("action_confusion"):
            parts += ["## Action: prompted (rows) and read by the probe (columns), generated videos", "",
                      confusion_table(alignment), ""]
    parts += [f"- {line}" for line in notes(result)]
    return "\n".join(parts) + "\n"


def write_report(result: dict, out_dir: str | Path, prompts, generated: np.ndarray, real: np.ndarray | None,
                 config, paired: bool = True) -> dict[str, str]:
    """metrics.json, metrics.md, samples.png (generated above real, first videos); mp4s on request, played at
    result["generation"]["fps"] (the run's training fps, so motion plays at the speed the model learnt).
    Unpaired real clips (a prompt file against a manifest) are labelled as reference clips."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics_json": out_dir / "metrics.json", "markdown": out_dir / "metrics.md",
             "contact_sheet": out_dir / "samples.png"}
    comparison_sheet(files["contact_sheet"], generated, real, [p.prompt for p in prompts], config.contact_sheet_videos,
                     real_label="real" if paired else "reference clip")
    if config.save_videos:
        for i, video in enumerate(generated):
            write_video(out_dir / "videos" / f"{i:03d}.mp4", video, fps=result["generation"]["fps"])
        files["videos"] = out_dir / "videos"
    files = {k: str(v) for k, v in files.items()}
    metrics = {k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in result["metrics"].items()}
    payload = {**result, "metrics": metrics, "files": files,
               "prompts": [_prompt_record(p, result, i) for i, p in enumerate(prompts)]}
    Path(files["metrics_json"]).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    Path(files["markdown"]).write_text(markdown_report(result))
    return files


def _prompt_record(prompt, result: dict, index: int) -> dict:
    record = {"prompt": prompt.prompt, "seed": result["generation"]["seed"] + index}
    for key in ("attributes", "render_seed", "group", "novel_combination", "reference"):
        if getattr(prompt, key) is not None:
            record[key] = getattr(prompt, key)
    predictions = result["metrics"].get("alignment", {}).get("predictions")
    if predictions and predictions[index] is not None:
        record["probe"] = predictions[index]
    return record


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Merge evaluation results into one Markdown table.")
    parser.add_argument("results", nargs="+", help="metrics.json files written by evaluate.py")
    parser.add_argument("--out", help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.results]
    table = results_table(results) + "\n"
    if args.out:
        Path(args.out).write_text(table)
        print(args.out)
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
