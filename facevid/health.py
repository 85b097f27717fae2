"""Checks that a run is still sound: non-finite losses, gradients and weights, and data-parallel replicas that
drift apart. A NaN/inf optimizer step is never applied; more than train.max_nonfinite_steps of them in a row stop
the run with an error naming the step and the last good checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from facevid.checkpoints import list_checkpoints
from facevid.engine import any_rank, local_shard

logger = logging.getLogger("facevid")


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights became NaN/inf: the run stops rather than train on garbage."""


@torch.no_grad()
def weights_checksum(params, chunk: int = 1 << 22) -> torch.Tensor:
    """(sum, sum of squares) of every value, in float64, on the parameters' device. Summed a chunk of each
    parameter at a time, so at most `chunk` float64 values exist at once (32 MB), never a float64 copy of the
    model or of one large parameter; no host sync either."""
    total = None
    for param in params:
        for piece in param.detach().reshape(-1).split(chunk):
            piece = piece.double()
            part = torch.stack([piece.sum(), piece.square().sum()])
            total = part if total is None else total + part
    return total


@torch.no_grad()
def weights_finite(model: torch.nn.Module) -> bool:
    """This rank's weights (its shards, under a sharding engine) hold no NaN/inf."""
    return bool(torch.stack([local_shard(p).isfinite().all() for p in model.parameters()]).all())


def step_finite(accelerator, grad_norm, losses_finite: torch.Tensor) -> bool:
    """Whether this optimizer step's loss and gradients are finite. Checked once per optimizer step, not per
    micro-step: the one host sync reads a scalar the clipping computed anyway, while the skip decision must be
    made before the optimizer touches the weights."""
    if grad_norm is not None and accelerator.scaler is None:
        # The norm of the all-reduced gradients: NaN if any rank's loss was, and the same on every rank.
        return bool(torch.isfinite(torch.as_tensor(local_shard(grad_norm))))  # DeepSpeed returns a float
    # fp16 (its GradScaler skips overflowing steps by itself and lowers the scale: not an error), or an
    # engine that clips internally: judge the loss, agreed across ranks.
    return not any_rank(accelerator, not bool(losses_finite))


class NonFiniteSteps:
    """Counts skipped (non-finite) optimizer steps: in a row, against the limit, and since the last log row."""

    def __init__(self, run_dir: Path, train):
        self.run_dir, self.train = Path(run_dir), train
        self.in_a_row = self.in_window = 0

    def count(self, finite: bool, step: int) -> None:
        """After optimizer step `step`: a skipped step is counted and reported; one more in a row than
        train.max_nonfinite_steps raises NonFiniteLossError."""
        limit = self.train.max_nonfinite_steps
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if finite:
            return
        self.in_window += 1
        if self.in_a_row > limit:
            raise self.error(f"the loss or its gradients are not finite (NaN or inf) for {self.in_a_row} "
                             f"optimizer step(s) in a row (train.max_nonfinite_steps={limit})", step)
        logger.warning("step %d: non-finite loss or gradients, step skipped (%d in a row, at most %d)",
                       step, self.in_a_row, limit)

    def error(self, what: str, step: int) -> NonFiniteLossError:
        t = self.train
        found = list_checkpoints(self.run_dir)
        where = (f"The last good checkpoint is {found[-1]}: resume from it with resume=latest and a lower "
                 f"train.learning_rate (now {t.learning_rate:g})" if found
                 else f"No checkpoint was written yet: start again with a lower train.learning_rate (now "
                      f"{t.learning_rate:g})")
        return NonFiniteLossError(
            f"step {step}: {what}; stopped without saving. {where}. "
            f"A rare bad batch can instead be skipped with train.max_nonfinite_steps (now {t.max_nonfinite_steps})")


@torch.no_grad()
def check_replicas_agree(accelerator, engine, model: torch.nn.Module, step: int) -> None:
    """Data-parallel ranks must hold identical weights after every optimizer step (train.replica_check_every)."""
    if not engine.replicated:
        logger.info("step %d: replica check skipped: %s shards the weights (ranks differ by design)", step,
                    engine.name)
        return
    checksum = weights_checksum(model.parameters()).to(accelerator.device)
    every_rank = accelerator.gather(checksum[None]).cpu()
    if not torch.equal(every_rank, every_rank[:1].expand_as(every_rank)):
        raise RuntimeError(f"step {step}: ranks' weights differ (checksums {every_rank.tolist()})")
    logger.info("step %d: weights identical on all %d rank(s)", step, accelerator.num_processes)
