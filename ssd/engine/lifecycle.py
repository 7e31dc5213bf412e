"""A run's life span: the training time across resumes, and stop signals.

- :class:`TrainClock`: seconds of training since the run began, the ones before the resume
  included (``elapsed`` in ``last.pt``), so ``train.time_limit`` and ``train.schedule_by_time`` go on
  where they stopped and ``time`` in ``metrics.jsonl`` never goes back.
- :class:`StopSignal`: SIGINT and SIGTERM set a flag; the loop finishes its step, saves ``last.pt``
  and returns. The loader's workers ignore both unless the SIGTERM comes from the process that owns
  them (:func:`ssd.data.loader._init_worker`): a signal to the whole process group (Ctrl-C,
  ``timeout``, Slurm) then stops the main process alone, which shuts its workers down as it ends.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any


def now() -> float:
    """The clock of :class:`TrainClock`, in seconds (a module function, so a test can replace it)."""
    return time.perf_counter()


class TrainClock:
    """Seconds of training since the run began: ``elapsed`` (from ``last.pt`` on resume) plus this
    process's time since :meth:`start`. The time between an interruption and its resume is not
    counted; after a kill, the steps repeated since the last save count again as they are repeated."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self.before = elapsed
        self.t0: float | None = None

    def start(self) -> None:
        self.t0 = now()

    def elapsed(self) -> float:
        return self.before + (now() - self.t0 if self.t0 is not None else 0.0)


class StopSignal:
    """SIGINT/SIGTERM set :attr:`received`; the loop saves ``last.pt`` and returns at the next step.

    A second signal while stopping changes nothing: finishing the step and writing ``last.pt`` takes
    seconds, and the same signal may well come twice (a launcher such as torchrun forwards a SIGTERM
    its processes may already have had from the group). SIGKILL ends the run at once, losing only the
    steps since the previous ``last.pt``, which the atomic write keeps intact."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[signal.Signals, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
