"""The GPU check's steps in order (:data:`STEPS`), and the two that run the project's own tools as
they are: ``ssd bench --device cuda`` and ``pytest -m cuda tests/test_cuda.py``."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .checks import bench_cell
from .machine import step_cuda, step_environment
from .record import Failed
from .runs import Check, last_line
from .training import (
    step_bf16,
    step_compile,
    step_data,
    step_fp16_channels_last,
    step_nccl_2gpu,
    step_resume,
    step_sync_debug,
)
from .weights import step_cpu_load, step_eval_gpu_vs_cpu


def step_bench(check: Check) -> dict:
    """``ssd bench --device cuda``: train_step (bf16 and fp16 vs torchvision), predict, train_loop (+ MFU)."""
    out = check.out / "bench.json"
    out.unlink(missing_ok=True)
    rows = "train_step predict train_loop"
    args = shlex.split(f"bench --device cuda --only {rows} --repeats 5 --json {out}")
    check.ssd("bench", args, 300)
    rows = json.loads(out.read_text())
    kept = [{k: v for k, v in r.items() if k == "name" or isinstance(v, (int, float))} for r in rows]
    summary = ", ".join(bench_cell(r) for r in rows)
    return {"rows": kept, "json": str(out), "summary": summary}


def step_pytest_cuda(check: Check) -> dict:
    """``pytest -m cuda tests/test_cuda.py``: the same paths on a tiny model, in pytest."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q"]
    try:
        log = check.call("pytest_cuda", [*command, "-p", "no:cacheprovider"], 600)
    except Failed as e:
        log = check.out / "logs" / "pytest_cuda.log"
        raise Failed(f"{last_line(log)} ({e})") from None
    return {"summary": last_line(log)}


@dataclass
class Step:
    name: str
    fn: Callable[[Check], dict]
    cuda_only: bool = False  # skipped in the CPU rehearsal
    optional: bool = False  # runs only when asked for (--pytest, or --only NAME)


# In order of importance, so that a run cut off by a time limit has done the essential ones.
STEPS = [
    Step("environment", step_environment),
    Step("cuda", step_cuda, cuda_only=True),
    Step("data", step_data),
    Step("fp16_channels_last", step_fp16_channels_last),
    Step("bf16", step_bf16),
    Step("resume", step_resume),
    Step("cpu_load", step_cpu_load),
    Step("eval_gpu_vs_cpu", step_eval_gpu_vs_cpu),
    Step("sync_debug", step_sync_debug, cuda_only=True),
    Step("compile", step_compile),
    Step("bench", step_bench, cuda_only=True),
    Step("nccl_2gpu", step_nccl_2gpu, cuda_only=True),
    Step("pytest_cuda", step_pytest_cuda, cuda_only=True, optional=True),
]
# what every other step builds on: they run even under --only
ALWAYS = ("environment", "cuda", "data")
