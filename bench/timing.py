"""Side-by-side timing shared by the benchmarks: variants take turns pass by pass, so load from other processes
(and CPU frequency changes) hits them alike; timing one variant after the other can invent a 1.5x gap."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def interleaved_median_seconds(runs: Sequence[Callable[[], object]], repeats: int, warmup: int = 1,
                               setup: Callable[[int], None] | None = None,
                               synchronize: Callable[[], None] | None = None) -> list[float]:
    """Median seconds of each run() over `repeats` passes after `warmup` untimed ones. setup(i), untimed, runs
    before each pass of run i; synchronize (e.g. torch.cuda.synchronize) brackets every timed pass."""
    times: list[list[float]] = [[] for _ in runs]
    for repeat in range(warmup + repeats):
        for i, run in enumerate(runs):
            if setup is not None:
                setup(i)
            if synchronize is not None:
                synchronize()
            start = time.perf_counter()
            run()
            if synchronize is not None:
                synchronize()
            if repeat >= warmup:
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
