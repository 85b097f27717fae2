"""A run's checkpoints: RUN/checkpoints/step-XXXXXXXX folders holding the engine's state (model, optimizer,
scheduler, EMA: facevid/engine.py), each rank's noise generator and the trainer's counters.

A checkpoint is written under a .tmp- name and renamed once complete, so a crash or a full disk never leaves a
half-written folder that looks like a checkpoint; the previous one stays the latest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from facevid.engine import any_rank

logger = logging.getLogger("facevid")

CHECKPOINT_PREFIX = "step-"
PARTIAL_PREFIX = ".tmp-"  # a checkpoint being written; renamed to its final name once complete


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (typically a full disk); the previous one is intact."""


@dataclass
class TrainerState:
    """Counters saved with every checkpoint (trainer_state.json)."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tracker_run_id: str | None = None
    skipped_clips: int = 0
    world_size: int = 1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has a .tmp- name and is never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_partial_checkpoints(run_dir: Path) -> None:
    """A save interrupted by kill -9 or a crash leaves a .tmp- folder that nothing would ever remove."""
    root = Path(run_dir) / "checkpoints"
    for leftover in sorted(root.glob(f"{PARTIAL_PREFIX}*")) if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
        logger.warning("removed a partial checkpoint left by an interrupted save: %s", leftover)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint the `resume` key names: None, "latest" (None when there is none yet) or a folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            logger.info("resume=latest: no checkpoint in %s yet, starting fresh", run_dir)
            return None
        return found[-1]
    return Path(resume)


class Checkpointer:
    """Writes and reads the checkpoints of one run, on every rank (the engine's state is per rank)."""

    def __init__(self, run_dir: Path, accelerator, engine, keep: int):
        self.run_dir, self.accelerator, self.engine, self.keep = Path(run_dir), accelerator, engine, keep

    def save(self, state: TrainerState, ema, generator: torch.Generator) -> Path:
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        name = f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
        final, tmp = root / name, root / f"{PARTIAL_PREFIX}{name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        error = None
        try:
            self.engine.save_state(tmp, ema)
            torch.save(generator.get_state(), tmp / f"noise_generator_{acc.process_index}.pt")
            if acc.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        except (OSError, RuntimeError) as err:  # RuntimeError: torch's zip writer on a full disk ("unexpected pos")
            error = err
        if any_rank(acc, error is not None):  # also the barrier: every rank learns of a failure on any rank
            raise self._write_error(tmp, state.global_step, error) from error
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint intact
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint saved: %s", final)
        acc.wait_for_everyone()
        return final

    def _write_error(self, tmp: Path, step: int, error: BaseException | None) -> CheckpointWriteError:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only takes space from the full disk
        cause = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
        previous = list_checkpoints(self.run_dir)
        kept = (f"the previous checkpoint {previous[-1].name} is intact" if previous
                else "there is no earlier checkpoint")
        return CheckpointWriteError(f"checkpoint at step {step} could not be written to {tmp.parent}: disk full? "
                                    f"({cause}) — {kept}")

    def load(self, path: Path, ema, generator: torch.Generator, seed: int) -> TrainerState:
        """Restores the engine's state and this rank's noise generator; returns the saved counters."""
        acc = self.accelerator
        logger.info("resuming from %s", path)
        self.engine.load_state(path, ema)
        state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
        generator_file = path / f"noise_generator_{acc.process_index}.pt"
        if state.world_size == acc.num_processes and generator_file.is_file():
            generator.set_state(torch.load(generator_file, weights_only=True))
        else:
            logger.warning("checkpoint was written by %d process(es), now %d: training noise is re-seeded "
                           "(the run continues, but not bit-identically)", state.world_size, acc.num_processes)
            generator.manual_seed(seed * 1009 + acc.process_index + state.global_step)
            state.world_size = acc.num_processes
        return state
