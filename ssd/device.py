"""The machine's rules, each stated once: which device a command runs on, the memory layout, the CPU's
cache and allocator. Measured once and fixed (docs/measurements.md), never probed at run time, so runs
stay reproducible."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path

import torch

# The VGG stem (conv1, conv2) runs on the CPU in chunks of images whose conv1 output (fp32) fits this many
# bytes, where nothing in it needs a gradient: a batch's full-resolution maps overflow the cache otherwise
STEM_CHUNK_BYTES = 4 << 20


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
    """``train.channels_last`` on ``device``: ``auto`` is on for the CPU and CUDA (NHWC is what oneDNN's
    and CUDA's tensor-core convolutions want)."""
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


def retain_freed_memory() -> bool:
    """Keep freed heap memory in the process instead of handing it back to the OS (glibc only).

    Training frees and reallocates the same multi-MiB activation buffers every step; glibc's defaults
    return them to the kernel (munmap, heap trim) and the next step page-faults them back in. Buffers
    up to 32 MiB (glibc's largest mmap threshold) then come from the heap, whose free top is kept up
    to 1 GiB. Returns whether the allocator took the settings (False off Linux or without ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def cpu_has_vnni() -> bool | None:
    """Whether this CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI), read from ``/proc/cpuinfo``;
    None where that cannot be told (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_vnni", "avx_vnni"} & set(line.split(":", 1)[1].split()))
    return None
