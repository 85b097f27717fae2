"""The EMA of a model's trainable parameters, and putting it into the model for a while.

The EMA (diffusers' EMAModel) keeps one shadow tensor per *trainable* parameter and pairs them with the
tensors it is handed by position. Handing it all parameters of a partly frozen model pairs the wrong tensors,
so everything that touches the EMA gets its parameters from `trainable_parameters`.
"""

from __future__ import annotations

from contextlib import contextmanager

from diffusers.training_utils import EMAModel
from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer and the EMA own, in the model's order."""
    return [p for p in model.parameters() if p.requires_grad]


def new_ema(params: list[nn.Parameter], decay: float) -> EMAModel:
    """The training EMA: foreach=True updates all shadow tensors in a few fused kernels instead of a few per
    tensor. Its state dict is the same either way, so checkpoints load in both directions."""
    return EMAModel(params, decay=decay, foreach=True)


@contextmanager
def ema_weights(ema, model: nn.Module):
    """Inside the block `model`'s trainable parameters hold their EMA (frozen ones are untouched); the
    training weights are put back afterwards, also on an exception. Without an EMA (None) nothing changes."""
    if ema is None:
        yield model
        return
    params = trainable_parameters(model)
    # Tensor by tensor: these copies are rare (validation, saving), and torch has no foreach copy for the DTensor
    # shards an FSDP2 run's EMA holds (its foreach update works).
    foreach, ema.foreach = ema.foreach, False
    try:
        ema.store(params)
        ema.copy_to(params)
        try:
            yield model
        finally:
            ema.restore(params)
    finally:
        ema.foreach = foreach
