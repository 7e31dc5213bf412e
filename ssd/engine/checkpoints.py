"""A run's checkpoints: ``last.pt`` (everything ``--resume`` needs to continue bit for bit) and ``best.pt``.

- :class:`Checkpointer` writes them. ``last.pt`` is written atomically; the file it replaces is kept as
  ``last.prev.pt`` (:func:`ssd.checkpoint.save_checkpoint`'s ``keep_previous``).
- ``--resume`` reads ``last.pt`` and, when that is missing or unreadable, ``last.prev.pt``, with a
  warning naming both (:func:`resume_checkpoint`); the run continues with its own saved settings
  (:func:`check_resumed_config`) and state (:func:`restore_state`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssd.checkpoint import (
    CheckpointError,
    add_ema,
    checkpoint_weights,
    load_checkpoint,
    load_state_strict,
    make_checkpoint,
    save_checkpoint,
)
from ssd.config import Config, ConfigError, to_dict
from ssd.engine import bn as bn_tools
from ssd.engine.distributed import all_true, barrier, gather_objects, unwrap
from ssd.engine.lifecycle import TrainClock
from ssd.engine.step import TrainingError, TrainStep

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
        "eval.train_sample",
    }
)


@dataclass
class Checkpointer:
    """Writes ``last.pt`` and ``best.pt`` of a run into ``out`` (from rank 0; every rank calls)."""

    out: Path
    cfg: Config
    classes: list[str]
    step: TrainStep
    scheduler: Any
    clock: TrainClock
    is_main: bool
    keep_last: bool = True  # an unreadable last.pt we fell back from is not kept over the last.prev.pt resumed from
    saved_at: int | None = None  # the iteration of the latest last.pt

    def save_last(self, iteration: int, best: dict) -> None:
        """The weights as they are, BN statistics included: with ``train.ema`` the average as the default
        ("model", "eval_weights": "ema") and the raw weights beside it."""
        step = self.step
        step.check()  # the pending steps' skips first: max_bad_steps stops before a save
        bn_tools.broadcast_bn_statistics(step.model)  # DDP: every rank continues with what is saved
        refuse_non_finite_bn(step.model, self.out / LAST)
        rng_states = gather_objects(rng_state(step.device))  # every rank's own random state
        if self.is_main:
            assert rng_states is not None  # gathered on the main rank
            ckpt = training_state(
                step.net, step.optimizer, self.scheduler, step.scaler, self.cfg, self.classes, iteration, best,
                rng_states, self.clock.elapsed(), step.ema,
            )  # fmt: skip
            save_checkpoint(ckpt, self.out / LAST, keep_previous=self.out / PREVIOUS if self.keep_last else None)
            self.keep_last = True
        self.saved_at = iteration
        barrier()

    def save_best(self, iteration: int, res: dict) -> None:
        ckpt = best_checkpoint(self.step.model, self.step.ema, self.cfg, self.classes, iteration, res)
        save_checkpoint(ckpt, self.out / "best.pt")


def refuse_non_finite_bn(model: nn.Module, last: Path) -> None:
    """Stop, on every rank, before a checkpoint with NaN or infinite BN running statistics is written."""
    broken = bn_tools.non_finite_bn_layers(model)
    if all_true(not broken):
        return
    raise TrainingError(
        f"BatchNorm running statistics are non-finite in {', '.join(broken) or 'another rank'}: not saved, {last} "
        "holds the last saved state. Skipped steps never change them: a finite loss came with non-finite "
        "activations. Lower train.lr, raise train.warmup_iters, or set train.clip_grad_norm."
    )


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch's CPU generator and, on CUDA, its own GPU's."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def training_state(
    model,
    optimizer,
    scheduler,
    scaler,
    cfg: Config,
    classes,
    iteration: int,
    best: dict,
    rng_states: list[dict],
    elapsed: float,
    ema=None,
) -> dict:
    """``rng_states``: :func:`rng_state` of every rank, in rank order (each restores its own);
    ``elapsed``: seconds of training so far (:class:`~ssd.engine.lifecycle.TrainClock`); ``ema``: the
    run's :class:`ssd.engine.ema.ModelEma` (``train.ema``), saved as the checkpoint's default weights."""
    ckpt = make_checkpoint(unwrap(model).state_dict(), cfg.model, classes, "train")
    if ema is not None:
        add_ema(ckpt, ema.state_dict(), ema.updates)
    ckpt.update(
        full_config=to_dict(cfg),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        iteration=iteration,
        elapsed=elapsed,
        best=best,
        rng={"ranks": rng_states},
    )
    return ckpt


def best_checkpoint(model, ema, cfg: Config, classes, iteration: int, res: dict) -> dict:
    """``best.pt``: the weights evaluated at ``iteration`` with their mAP (``res`` from the training loop's
    evaluation); with ``ema`` (``train.ema``) the average is the default and ``map_raw`` the raw weights'."""
    ckpt = make_checkpoint(unwrap(model).state_dict(), cfg.model, classes, "train") | {
        "iteration": iteration,
        "map": res["map"],
    }
    if ema is not None:
        add_ema(ckpt, ema.state_dict(), ema.updates)
        ckpt["map_raw"] = res["metrics"]["map_raw"]
    return ckpt


def read_training_state(path: Path) -> dict:
    """``last.pt`` as :func:`training_state` wrote it; :class:`CheckpointError` when it is not one."""
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt or "iteration" not in ckpt:
        raise CheckpointError(
            f"{path}: not a training checkpoint (no optimizer state); use model.init to fine-tune from it"
        )
    return ckpt


def restore_state(
    ckpt: dict, path: Path, model, optimizer, scheduler, scaler, device: torch.device, rank: int = 0, ema=None
) -> tuple[int, dict, float]:
    """Load :func:`read_training_state`'s ``ckpt`` (read from ``path``) into the run's objects. Returns
    ``(iteration, best, elapsed)``; checkpoints from before ``elapsed`` was saved give 0 seconds.
    ``ema`` (``train.ema``) gets the saved average and its update count; a checkpoint without one starts
    it from the resumed weights."""
    source = f"{path} (resume; was the model config changed?)"
    load_state_strict(unwrap(model), checkpoint_weights(ckpt, "raw", path), source)
    has_ema = ckpt.get("eval_weights") == "ema"
    if ema is not None and has_ema:
        ema.load(ckpt["model"], ckpt["ema_updates"], source)
    elif ema is not None:
        log.warning("%s has no EMA of the weights (saved without train.ema): the average starts from its weights", path)
        ema.reset(unwrap(model))
    elif has_ema:
        log.warning("%s holds an EMA of the weights, but train.ema is off: the run goes on without it", path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    ranks = rng.get("ranks") or [{"torch": rng["torch"], "cuda": None}]  # checkpoints before per-rank states: rank 0's
    if rank >= len(ranks):
        log.warning("%s was saved by %d process(es); rank %d continues rank 0's random state", path, len(ranks), rank)
    mine = ranks[rank] if rank < len(ranks) else ranks[0]
    torch.set_rng_state(mine["torch"])
    if mine.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
    return int(ckpt["iteration"]), dict(ckpt.get("best", {})), float(ckpt.get("elapsed", 0.0))


def trim_metrics(path: Path, iteration: int) -> None:
    """On resume drop the lines logged after the checkpoint, so metrics.jsonl reads as one run
    (and a line torn by a kill mid-write)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("iter", 0) <= iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


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
