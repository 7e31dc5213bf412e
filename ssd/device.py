"""Which torch device a command runs on: one rule for training, evaluation and inference."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str, local_rank: int = 0, key: str = "--device", world_size: int = 1) -> torch.device:
    """``auto`` (CUDA if present), ``cpu``, ``cuda`` (this process's GPU under torchrun) or ``cuda:N``
    (one process only: under torchrun every rank would take GPU N, so it is refused)."""
    if world_size > 1 and name.startswith("cuda:"):
        raise ValueError(
            f"{key} {name}: under torchrun ({world_size} processes) every rank would use that one GPU; "
            "use cuda (or auto): each process then takes the GPU of its LOCAL_RANK"
        )
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


def use_channels_last(setting: str, device: torch.device) -> bool:
    """``train.channels_last`` on ``device``: ``auto`` is on for the CPU and CUDA, a fixed rule measured
    once (README "Performance": the training step 1.2-1.3x faster on the CPU; NHWC is what CUDA's
    tensor-core convolutions want), not probed at run time, so runs stay reproducible."""
    return setting == "true" or (setting == "auto" and device.type in ("cpu", "cuda"))


@contextlib.contextmanager
def full_fp32():
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (full fp32 on Ampere and newer,
    for comparisons against the CPU); the flags are restored after. No effect on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
