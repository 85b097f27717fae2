"""What a run writes for people to read: the console log, RUN/metrics.jsonl, RUN/skipped_clips.jsonl, and the
tracker (TensorBoard or Weights & Biases) with its media. Main process only, except where said."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from accelerate.utils import gather_object
from omegaconf import OmegaConf

from data.manifest import SkippedItem
from facevid.checkpoints import PARTIAL_PREFIX

logger = logging.getLogger("facevid")

def setup_logging(accelerator) -> None:
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def write_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _row_step(line: str) -> float:
    """A log row's step; rows without one (older files) count as step -inf, a torn last line as +inf."""
    try:
        return json.loads(line).get("step", float("-inf"))
    except ValueError:
        return float("inf")


def drop_rows_after(run_dir: Path, step: int) -> None:
    """Rows logged after the checkpoint a run resumes from (by a run killed before its next one) are logged again
    by the resumed run: drop them, so every step appears once in metrics.jsonl and skipped_clips.jsonl."""
    for name in ("metrics.jsonl", "skipped_clips.jsonl"):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) < len(lines):
            rewritten = path.with_name(f"{PARTIAL_PREFIX}{name}")
            rewritten.write_text("".join(kept), encoding="utf-8")
            os.replace(rewritten, path)  # a kill now leaves the old file, never half of it
            logger.info("%s: dropped %d row(s) logged after step %d", name, len(lines) - len(kept), step)


def report_skipped(accelerator, run_dir: Path, skipped: list[SkippedItem], step: int, epoch: int) -> int:
    """End of an epoch, on every rank: gathers every rank's skipped clips; the main process writes each file once
    to skipped_clips.jsonl and the log. Returns how many distinct files were skipped (0 on other ranks)."""
    everything = gather_object([(s.source, s.reason) for s in skipped])
    if not accelerator.is_main_process or not everything:
        return 0
    unique = dict(everything)
    with open(Path(run_dir) / "skipped_clips.jsonl", "a", encoding="utf-8") as handle:
        for source, reason in unique.items():
            handle.write(json.dumps({"step": step, "epoch": epoch, "video": source, "reason": reason}) + "\n")
    lines = "\n  ".join(f"{s}: {r}" for s, r in list(unique.items())[:20])
    logger.warning("epoch %d: %d clip(s) skipped (unreadable, corrupt or too short):\n  %s%s",
                   epoch, len(unique), lines, "\n  ..." if len(unique) > 20 else "")
    return len(unique)


def init_trackers(accelerator, cfg, run_dir: Path, run_id: str | None) -> str | None:
    """Starts train.tracker with the flattened config; returns the W&B run id to checkpoint (resumed runs log
    into the same W&B run)."""
    if cfg.train.tracker == "none":
        return run_id
    init_kwargs = {}
    if cfg.train.tracker == "wandb":
        import wandb

        # Offline unless the user is logged in; its files go inside the run directory.
        os.environ.setdefault("WANDB_DIR", str(Path(run_dir).resolve()))
        if not os.environ.get("WANDB_API_KEY") and not wandb.api.api_key:
            os.environ.setdefault("WANDB_MODE", "offline")
        if run_id is None:
            # wandb's own id helper moved between releases; any 8 lowercase hex characters are a valid run id.
            run_id = secrets.token_hex(4)
        init_kwargs["wandb"] = {"id": run_id, "resume": "allow", "name": Path(run_dir).name,
                                "dir": str(Path(run_dir).resolve())}
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in _flatten(OmegaConf.to_container(OmegaConf.structured(cfg))).items()}
    project = cfg.train.wandb_project if cfg.train.tracker == "wandb" else "tb"
    accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)
    return run_id


def log_media(accelerator, tracker: str, media: dict[str, list[Path]], step: int) -> None:
    """Log validation videos (mp4) and contact sheets (png) to the active tracker."""
    if tracker == "wandb":
        import wandb

        payload = {}
        for key, paths in media.items():
            payload[key] = [wandb.Video(str(p)) if p.suffix == ".mp4" else wandb.Image(str(p)) for p in paths]
        accelerator.get_tracker("wandb", unwrap=True).log(payload, step=step)
    elif tracker == "tensorboard":
        import numpy as np
        from PIL import Image

        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for key, paths in media.items():
            for i, p in enumerate(pp for pp in paths if pp.suffix == ".png"):
                writer.add_image(f"{key}/{i}", np.asarray(Image.open(p).convert("RGB")), step, dataformats="HWC")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
