"""Timing helpers shared by the bench rows."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each function (seconds), the calls alternating between them.

    The minimum, not the median: a forward pass takes seconds and the machine is shared, so most runs
    are slowed by whatever else runs; the fastest one is the least disturbed (measured here under load:
    the same SSD300 forward took 0.49 to 1.05 s per image from one run to the next)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(elapsed(fn))
    return {k: min(v) for k, v in times.items()}
