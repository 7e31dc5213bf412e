"""A run's life span: the checkpoint ``--resume`` continues from, the training time across resumes,
and stop signals.

- ``last.pt`` is written atomically; the file it replaces is kept as ``last.prev.pt``
  (:func:`ssd.checkpoint.save_checkpoint`'s ``keep_previous``). ``--resume`` reads ``last.pt`` and, when
  that is missing or unreadable, ``last.prev.pt``, with a warning naming both.
- :class:`TrainClock`: seconds of training since the run began, the ones before the resume
  included (``elapsed`` in ``last.pt``), so ``train.time_limit`` and ``train.schedule_by_time`` go on
  where they stopped and ``time`` in ``metrics.jsonl`` never goes back.
- :class:`StopSignal`: SIGINT and SIGTERM set a flag; the loop finishes its step, saves ``last.pt``
  and returns. The loader's workers ignore both unless the SIGTERM comes from the process that owns
  them (:func:`ssd.data.loader._init_worker`): a signal to the whole process group (Ctrl-C,
  ``timeout``, Slurm) then stops the main process alone, which shuts its workers down as it ends.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ssd.checkpoint import CheckpointError
from ssd.config import ConfigError
from ssd.engine.state import read_training_state

log = logging.getLogger("ssd.train")

LAST, PREVIOUS = "last.pt", "last.prev.pt"
# what a resume may change: how the run is watched and fed, never what it computes
RESUME_FREE_KEYS = frozenset(
    {
        "data.num_workers",
        "data.worker_nice",
        "train.log_period",
        "train.checkpoint_period",
        "train.tensorboard",
        "train.tensorboard_images",
        "eval.batch_size",
    }
)


def _dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumed_config(given: dict, saved: dict | None, source: Path, out: Path) -> None:
    """A resume continues the run as it was started: ``given`` (the resolved config of this command,
    :func:`~ssd.config.to_dict`) must equal ``saved`` (the checkpoint's) except in :data:`RESUME_FREE_KEYS`,
    whose changes are logged; other differences raise :class:`ConfigError` naming each key."""
    if saved is None:  # a checkpoint written before the full config was saved in it
        return
    mine, theirs = _dotted(given), _dotted(saved)
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    refused = [k for k in changed if k not in RESUME_FREE_KEYS]
    if refused:
        shown = "; ".join(f"{k}: {mine.get(k)!r} given, {theirs.get(k)!r} in the run" for k in refused[:6])
        raise ConfigError(
            f"--resume continues the run saved in {source} as it was started, and this command changes {shown}"
            f"{' ...' if len(refused) > 6 else ''}. Resume with its own config: ssd train {out / 'config.yaml'} "
            f"--output-dir {out} --resume, or train into a new --output-dir"
        )
    for key in changed:
        log.info("resume: %s %r -> %r (applied: it does not change the result)", key, theirs.get(key), mine.get(key))


def resume_checkpoint(out: Path) -> tuple[Path, dict, bool]:
    """The training checkpoint ``--resume`` continues from: ``out/last.pt``, else ``out/last.prev.pt``.

    Returns ``(path, checkpoint, fell_back)``. Raises ``FileNotFoundError`` when neither file exists and
    :class:`CheckpointError` naming both files when neither can be read."""
    last, previous = out / LAST, out / PREVIOUS
    if not last.exists() and not previous.exists():
        raise FileNotFoundError(f"{last}: nothing to resume (train without --resume to start)")
    try:
        return last, read_training_state(last), False
    except CheckpointError as e:
        if not previous.exists():
            raise
        error = e
    try:
        ckpt = read_training_state(previous)
    except CheckpointError as e:
        raise CheckpointError(f"{error}; and the previous checkpoint {e}") from None
    log.warning(
        "%s; resuming from the previous checkpoint %s (iteration %d) instead", error, previous, ckpt["iteration"]
    )
    return previous, ckpt, True


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
