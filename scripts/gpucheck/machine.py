"""The steps that say what the machine is: ``environment`` (interpreter, package versions, driver,
how gpu_check.sh installed) and ``cuda`` (a GPU is there and computes), and :class:`tf32_off`."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys

from .record import Failed
from .runs import REPO, Check

# versions the environment step records (distribution names)
PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "opencv-python-headless",
    "albumentations",
    "albucore",
    "pydantic",
    "pydantic-core",
    "pycocotools",
    "typing-extensions",
    "PyYAML",
    "ssd",
)


def step_environment(check: Check) -> dict:
    """Interpreter, package versions, GPU driver, how gpu_check.sh installed; the imports the runs need."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    numbers = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "git": git_commit(),
        "nvidia_driver": nvidia_driver(),
        "install": os.environ.get("GPU_CHECK_INSTALL", "not through gpu_check.sh"),
    }
    problems = []
    for module in ("torch", "torchvision", "albumentations", "pycocotools.coco", "ssd"):
        try:
            importlib.import_module(module)
        except Exception as e:  # any import error is the finding
            problems.append(f"import {module}: {type(e).__name__}: {e}")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        numbers.update(
            torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None
        )
    numbers["summary"] = (
        f"Python {numbers['python']}, torch {versions['torch']} (CUDA {numbers.get('torch_cuda')}), "
        f"torchvision {versions['torchvision']}, albumentations {versions['albumentations']}, "
        f"{os.cpu_count()} CPUs"
    )
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def step_cuda(check: Check) -> dict:
    """A GPU is there and computes: an fp32 matmul (TF32 off) agrees with the CPU's."""
    import torch

    if not torch.cuda.is_available():
        raise Failed(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU")
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(
            {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        )
    check.gpu_name, check.gpus = gpus[0]["name"], len(gpus)
    a, b = (
        torch.randn(512, 512, generator=torch.Generator().manual_seed(0)),
        torch.randn(512, 512, generator=torch.Generator().manual_seed(1)),
    )
    with tf32_off():
        diff = float((a.cuda() @ b.cuda()).cpu().sub(a @ b).abs().max())
    numbers = {
        "gpus": gpus,
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "matmul_max_abs_diff": diff,
        "summary": f"{len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB, sm {gpus[0]['capability']}), "
        f"bf16 {torch.cuda.is_bf16_supported()}, fp32 matmul vs CPU {diff:.1e}",
    }
    if diff > 1e-2:
        raise Failed(f"an fp32 matmul on the GPU differs from the CPU's by {diff:.3g}", numbers)
    return numbers


def tf32_off():
    """TF32 off inside the block (``ssd.device.full_fp32``; imported here, when torch is known to be there)."""
    from ssd.device import full_fp32

    return full_fp32()
