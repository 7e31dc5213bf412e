"""Timing helpers shared by the bench rows.

``cuda=True`` brackets each timed call with ``torch.cuda.synchronize()``: CUDA work is queued
asynchronously, so without it a timer measures how fast Python queues kernels, not how fast they run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def timeit(fn: Callable[[], object], repeats: int, cuda: bool = False) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    return statistics.median(elapsed(fn, cuda) for _ in range(repeats))


def elapsed(fn: Callable[[], object], cuda: bool = False) -> float:
    """Wall time of one call of ``fn`` (seconds); with ``cuda``, until the GPU has finished it."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    before: Mapping[str, Callable[[], object]] | None = None,
    cuda: bool = False,
) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each function (seconds), the calls alternating between them.

    The minimum, not the median: a forward pass takes seconds and the machine is shared, so most runs
    are slowed by whatever else runs; the fastest one is the least disturbed (measured here under load:
    the same SSD300 forward took 0.49 to 1.05 s per image from one run to the next).
    ``before[name]``, if given, runs untimed before each call of ``fns[name]`` (e.g. to put weights back).
    """
    return {k: min(v) for k, v in interleaved(fns, repeats, before, cuda).items()}


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    before: Mapping[str, Callable[[], object]] | None = None,
    cuda: bool = False,
) -> dict[str, list[float]]:
    """Wall times (seconds) of ``repeats`` rounds, each calling every function once in turn, in reverse
    order every other round (a drift or a cache left warm by the previous call then favours no function):
    ``times[name][i]`` is ``fns[name]``'s call in round ``i`` (see :func:`best_interleaved`)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in list(fns.items())[:: -1 if i % 2 else 1]:
            if before and k in before:
                before[k]()
            times[k].append(elapsed(fn, cuda))
    return times


def paired_speedup(ours: list[float], peer: list[float]) -> float:
    """Median over rounds of ``peer[i] / ours[i]``, the two timed back to back in round ``i``.

    For steps of seconds on a shared machine whose speed drifts by tens of percent within minutes, the
    ratio within a round cancels the drift that the ratio of two independent minima does not (measured
    here on SSD300 training steps: six runs of five rounds gave ratios of the minima from 1.06x to 1.27x,
    medians of the paired ratios from 1.14x to 1.21x)."""
    return statistics.median(p / o for o, p in zip(ours, peer, strict=True))
