"""Start-up work done once, on the main process, its result shared with every rank.

Checking a 270k-clip dataset (bucket planning reads every clip's header; validate_clips reads 64) on every
rank multiplies the file-system load by the number of ranks, all at the same moment; the ranks would reach the
same answer anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

T = TypeVar("T")


def on_main_process(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """work() on the main process only; its result (or the exception it raised, re-raised) on every rank.
    Collective: every rank must call it. The result must pickle."""
    if accelerator.num_processes == 1:
        return work()
    shared: list = [None]
    if accelerator.is_main_process:
        try:
            shared = [(True, work())]
        except Exception as err:  # every rank must fail alike, not wait forever for a result
            shared = [(False, err)]
    broadcast_object_list(shared, from_process=0)
    ok, value = shared[0]
    if not ok:
        raise value
    return value
