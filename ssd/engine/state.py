"""Training state in ``last.pt``: what a resumed run needs to continue bit for bit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ssd.checkpoint import (
    CheckpointError,
    add_ema,
    checkpoint_weights,
    load_checkpoint,
    load_state_strict,
    make_checkpoint,
)
from ssd.config import Config, to_dict

log = logging.getLogger("ssd.train")


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
    ``elapsed``: seconds of training so far (:class:`ssd.engine.lifecycle.TrainClock`); ``ema``: the
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


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
