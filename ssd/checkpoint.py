"""Checkpoint files: plain dicts, written atomically, always read with ``weights_only=True``.

Layout (``version`` 1)::

    {"format": "ssd", "version": 1, "source": "train" | "torchvision" | ...,
     "model": state_dict, "config": {"model": {...}}, "classes": [foreground names]}

The preprocessing the weights expect (channel order, scale, mean, std, resize) is part of
``config["model"]["preprocess"]``, so converted foreign weights predict with their own.

A run with ``train.ema`` adds ``"eval_weights": "ema"``, ``"model_raw"`` (the trained weights) and
``"ema_updates"``; its ``model`` is then the moving average, the weights its logged mAP belongs to.
``model`` is always the checkpoint's default weights, so every reader of the file (``model.init``
fine-tuning, scripts, code from before EMA) gets them without knowing about EMA; a checkpoint without
``eval_weights`` holds its raw weights only. :func:`checkpoint_weights` picks either kind.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssd.config import ConfigError, ModelConfig, from_dict, to_dict
from ssd.model import SSD, build_ssd

FORMAT = "ssd"
VERSION = 1
WEIGHTS_KINDS = ("ema", "raw")  # model_from_checkpoint(weights_kind=...), ssd eval / predict --weights-kind


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or in a layout this code does not read."""


def make_checkpoint(
    state: dict[str, Tensor], model_cfg: ModelConfig, classes: list[str], source: str
) -> dict[str, Any]:
    if len(classes) != model_cfg.num_classes - 1:
        raise ValueError(f"{len(classes)} class names for a model with {model_cfg.num_classes - 1} foreground classes")
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "config": {"model": to_dict(model_cfg)},
        "classes": list(classes),
    }


def add_ema(ckpt: dict[str, Any], ema_state: dict[str, Tensor], updates: int) -> dict[str, Any]:
    """Make :func:`make_checkpoint`'s ``ckpt`` (raw weights) one whose default weights are the moving
    average ``ema_state`` after ``updates`` updates (``train.ema``); the raw weights move to ``model_raw``."""
    ckpt["model_raw"] = ckpt["model"]
    ckpt["model"] = {k: v.detach().cpu() for k, v in ema_state.items()}
    ckpt["eval_weights"] = "ema"
    ckpt["ema_updates"] = int(updates)
    return ckpt


def checkpoint_weights(
    ckpt: dict[str, Any], weights_kind: str | None = None, path: str | os.PathLike = "checkpoint"
) -> dict[str, Tensor]:
    """The state dict of ``weights_kind``: None, the checkpoint's default (``model``: the EMA weights of a
    run with ``train.ema``, else the raw ones); ``"raw"`` the trained weights; ``"ema"`` the moving average
    (a :class:`CheckpointError` for a checkpoint without one)."""
    if weights_kind not in (None, *WEIGHTS_KINDS):
        raise ValueError(
            f"weights kind must be {' or '.join(WEIGHTS_KINDS)} (or unset: the checkpoint's default), "
            f"got {weights_kind!r}"
        )
    has_ema = ckpt.get("eval_weights") == "ema"
    if weights_kind == "ema" and not has_ema:
        raise CheckpointError(
            f"{path}: holds no EMA weights (trained without train.ema); its only weights are the raw ones"
        )
    if weights_kind == "raw" and has_ema:
        return ckpt["model_raw"]
    return ckpt["model"]


def save_checkpoint(
    obj: dict[str, Any], path: str | os.PathLike, keep_previous: str | os.PathLike | None = None
) -> None:
    """Write ``obj`` to ``path`` atomically: temporary file in the same folder, fsync, rename.
    A crash at any point leaves either the previous file or the new one, never a torn file.

    ``keep_previous``: once the new file is on disk, the file ``path`` held becomes this one (a hard
    link renamed over it, so ``path`` exists at every instant; where the filesystem has no hard links,
    ``path`` is renamed, and only ``keep_previous`` holds a checkpoint until the new file takes its place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint gets the mode open() would give
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            _keep_as(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keep_as(path: Path, previous: Path) -> None:
    link = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links here (some network and FUSE filesystems)
        os.replace(path, previous)
        return
    os.replace(link, previous)


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # a plain pickle warns before it fails; the error says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, not a torch file at all
        raise CheckpointError(f"{path}: cannot read as a PyTorch weights file: {_why_unreadable(path, e)}") from None


def _why_unreadable(path: Path, error: Exception) -> str:
    """One plain clause for a failed ``torch.load``, without torch's advice to drop ``weights_only``."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    # torch.save writes a zip archive (or, before 1.6, a pickle)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "not a file written by torch.save"
    text = str(error)
    if "Unsupported operand" in text:  # a pickle, not torch.save's layout
        return "not a file written by torch.save"
    if "Weights only load failed" in text:  # a pickled Python object the weights-only unpickler refuses to run
        name = re.search(r"GLOBAL (\S+)", text)
        return (
            f"it holds a Python object{f' ({name.group(1)})' if name else ''}; checkpoints are read as tensors and "
            "plain containers only (torch.load with weights_only=True): save a state_dict instead"
        )
    first = text.strip().split(". ")[0].splitlines()[0] if text.strip() else type(error).__name__
    return f"truncated or corrupt ({first})"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our checkpoints; a foreign layout gets a hint to ``ssd convert``."""
    obj = load_file(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not an ssd checkpoint (top-level keys {keys}); "
            "convert foreign weights first: "
            "ssd convert --from {torchvision,amdegroot,lufficc,vgg16,vgg16_bn} SRC --out DST.pt"
        )
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj['version']} is newer than this code reads ({VERSION})")
    missing = [k for k in ("model", "config", "classes") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return obj


def checkpoint_model_config(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> ModelConfig:
    try:
        return from_dict(ModelConfig, ckpt["config"]["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: bad model config inside the checkpoint: {e}") from None


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``load_state_dict`` that reports missing / unexpected / mis-shaped keys by name."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state)


def model_from_checkpoint(path: str | os.PathLike, weights_kind: str | None = None) -> tuple[SSD, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights. Returns ``(model, ckpt)``.

    ``weights_kind`` (:func:`checkpoint_weights`): None loads the checkpoint's default weights, the EMA
    ones of a run with ``train.ema`` (those its logged mAP belongs to); ``"raw"`` / ``"ema"`` pick one."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == "backbone":
        raise CheckpointError(
            f"{path}: holds only a backbone ({ckpt['source']}); use it as model.init_backbone, not as a detector"
        )
    state = checkpoint_weights(ckpt, weights_kind, path)
    model = build_ssd(checkpoint_model_config(ckpt, path))
    load_state_strict(model, state, str(path) + (f" ({weights_kind} weights)" if weights_kind else ""))
    return model, ckpt
