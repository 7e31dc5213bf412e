"""Which torch device a command runs on: one rule for training, evaluation and inference."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0, key: str = "--device") -> torch.device:
    """``auto`` (CUDA if present), ``cpu``, ``cuda`` (this process's GPU under torchrun) or ``cuda:N``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key} {name}: CUDA is not available; use cpu or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
