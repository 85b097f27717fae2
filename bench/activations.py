"""Activation memory of a training step, independent of the allocator: the bytes of the tensors autograd saves for
backward. Used by the benchmarks and by the tests that check gradient checkpointing saves memory."""

from __future__ import annotations

import torch


class SavedForBackward:
    """`with SavedForBackward(model) as saved:` records every tensor autograd saves for backward inside the block;
    `saved.bytes` is their size, each storage counted once, the model's parameters left out (they are held anyway).
    """

    def __init__(self, model: torch.nn.Module):
        self._parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
