#!/usr/bin/env python3
"""The GPU check: the project's CUDA paths in one run of a few minutes (docs/gpu.md).

    bash scripts/gpu_check.sh [--out DIR]           # installs the project first, then runs this file
    python scripts/gpu_check.py [--out DIR] [--only STEP ...] [--skip STEP ...] [--pytest] [--list]
    python scripts/gpu_check.py --cpu [--out DIR]   # rehearse the check itself on a CPU (tiny model)

A full-size SSD300 trains ~30 iterations on generated shapes in each setting (fp16 + channels_last,
bf16, ``train.compile``), resumes, loads on the CPU, evaluates on both devices, trains under
``train.sync_debug``, then come the CUDA bench rows and, with 2+ GPUs, a 2-process NCCL run.

Each step is a function ``(Check) -> numbers``. :class:`Report` records ``{name, ok, seconds, numbers,
error}`` in OUT/gpu_check.json when the step starts ("running") and again when it ends, so a run that is
cut off still says what it did; a failing step does not stop the next. Training and evaluation run as
``python -m ssd`` subprocesses with one log each in OUT/logs/, so a CUDA error in one cannot poison the
next. Exit code 0 when no step failed, 1 when one did, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INIT_SCALE = 65536.0  # torch.amp.GradScaler's default init_scale
SETTLE = 10  # the GradScaler scale may fall in iterations 1..SETTLE, never after
MAP_TOLERANCE = 1e-4  # ssd eval on the GPU (fp32, TF32 off) vs the CPU
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
# the CPU rehearsal's model: tests/test_train.py's 64 px, width-1/8 SSD with BN in every block
TINY_MODEL = {"input_size": 64, "width": 0.125, "batch_norm": "all"}
TINY_MODEL["extras"] = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}]


class Failed(Exception):
    """A step's check did not hold; ``numbers`` are still recorded."""

    def __init__(self, message: str, numbers: dict | None = None):
        super().__init__(message)
        self.numbers = numbers or {}


class Skipped(Exception):
    """A step that cannot run here (no second GPU, a missing input); the message says why."""


# --- the record --------------------------------------------------------------------------------


def json_safe(value):
    """``value`` with non-finite floats as strings ("nan", "inf"): strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Report:
    """OUT/gpu_check.json, rewritten (atomically) whenever a step starts or ends.

    A step record is ``{name, ok, status, seconds, summary, numbers, error}``: ``ok`` is true or false,
    or null for a step that was skipped (``error`` then says why) or is still running."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.doc = {
            "check": "ssd gpu_check",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished": None,
            **meta,
            "steps": [],
        }
        self.t0 = time.perf_counter()
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(json_safe(self.doc), indent=1) + "\n")
        os.replace(tmp, self.path)

    def run(self, name: str, fn: Callable, *args) -> dict:
        """Run ``fn(*args)``, record its numbers or its failure, and write the file before and after."""
        rec = self._add(name, "running")
        t0 = time.perf_counter()
        try:
            rec["numbers"] = dict(fn(*args) or {})
            rec.update(ok=True, status="ok")
        except Skipped as e:
            rec.update(status="skipped", error=str(e))
        except Failed as e:
            rec.update(ok=False, status="failed", numbers=e.numbers, error=str(e))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a time limit): say so, then stop
            rec.update(ok=False, status="interrupted", error="interrupted")
            raise
        except Exception as e:  # noqa: BLE001  (a bug or an unexpected error: record it, go on with the next step)
            rec.update(ok=False, status="failed", error=f"{type(e).__name__}: {e}")
            rec["traceback"] = traceback.format_exc(limit=-4)
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rec["summary"] = str(rec["numbers"].pop("summary", ""))
            self.write()
        return rec

    def skip(self, name: str, reason: str) -> dict:
        return self._add(name, "skipped", error=reason, seconds=0.0)

    def _add(
        self,
        name: str,
        status: str,
        error: str | None = None,
        seconds: float | None = None,
    ) -> dict:
        rec = {"name": name, "ok": None, "status": status, "seconds": seconds}
        rec.update(summary="", numbers={}, error=error)
        self.doc["steps"].append(rec)
        self.write()
        return rec

    def finish(self) -> None:
        counts = {
            s: sum(r["status"] == s for r in self.doc["steps"])
            for s in ("ok", "failed", "skipped", "interrupted")
        }
        self.doc.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            seconds=round(time.perf_counter() - self.t0, 1),
            result=counts,
        )
        self.write()

    @property
    def failed(self) -> bool:
        return any(r["ok"] is False for r in self.doc["steps"])

    def table(self) -> str:
        return format_table(self.doc, self.path)


def format_table(doc: dict, path: Path, width: int = 120) -> str:
    """One line per step of a gpu_check.json document (result, seconds, summary or error), a count,
    then every error in full."""
    steps = doc["steps"]
    name_w = max([len("step")] + [len(r["name"]) for r in steps])
    room = width - name_w - 23
    lines = [f"{'step':<{name_w}}  {'result':<11} {'seconds':>7}  summary"]
    for r in steps:
        text = r["summary"] if r["status"] == "ok" else (r["error"] or "")
        text = text if len(text) <= room else text[: room - 3] + "..."
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['name']:<{name_w}}  {r['status']:<11} {seconds:>7}  {text}")
    count = {
        s: sum(r["status"] == s for r in steps)
        for s in ("ok", "failed", "skipped", "running")
    }
    total = sum(r["seconds"] or 0 for r in steps)
    counts = ", ".join(f"{n} {s}" for s, n in count.items() if n or s != "running")
    lines.append(f"{counts} in {total:.0f} s; record: {path}")
    lines += [f"\n{r['name']} failed: {r['error']}" for r in steps if r["ok"] is False]
    return "\n".join(lines)


# --- what a training run's outputs say (pure functions: tests/test_gpu_check.py runs them) -----------


def analyse_rows(
    rows: list[dict], expected_iters: list[int], scaler: bool, settle: int = SETTLE
) -> tuple[dict, list[str]]:
    """Numbers and problems of the metrics.jsonl loss rows of one run.

    Every expected iteration is logged, losses are finite, and no step was skipped (``skipped``:
    non-finite loss or gradients). With ``scaler`` (fp16), ``grad_scale`` may fall (an overflow,
    the step skipped) only in iterations up to ``settle``; after them it stays and nothing is skipped."""
    problems = []
    iters = [r["iter"] for r in rows]
    if iters != expected_iters:
        problems.append(
            f"logged iterations {compact(iters)}, expected {compact(expected_iters)}"
        )
    # a window whose steps were all skipped logs no loss (null); a logged loss is a mean of updating steps
    bad = [
        r["iter"]
        for r in rows
        if any(
            r.get(k) is not None and not math.isfinite(float(r[k]))
            for k in ("loss", "loc", "conf")
        )
    ]
    if bad:
        problems.append(f"non-finite loss at iteration(s) {compact(bad)}")
    empty = [r["iter"] for r in rows if r.get("loss") is None and not r.get("skipped")]
    if empty:
        problems.append(f"no loss logged at iteration(s) {compact(empty)}")
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    numbers = {
        "iterations": len(rows),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    if rows and any("skipped" not in r for r in rows):
        problems.append(
            "metrics.jsonl rows have no 'skipped' count (the engine predates issue 14)"
        )
    skipped_at = [r["iter"] for r in rows if r.get("skipped", 0)]
    numbers["skipped"] = sum(r.get("skipped", 0) for r in rows)
    if not scaler:
        if skipped_at:
            problems.append(f"steps skipped at iteration(s) {compact(skipped_at)}")
        return numbers, problems
    scales = [r.get("grad_scale") for r in rows]
    if rows and any(s is None for s in scales):
        problems.append(
            "metrics.jsonl rows have no grad_scale (the engine predates issue 14)"
        )
        return numbers, problems
    drops = [
        r["iter"]
        for r, before in zip(rows, [INIT_SCALE] + scales)
        if r["grad_scale"] < before
    ]
    numbers.update(
        grad_scale_first=scales[0] if scales else None,
        grad_scale_last=scales[-1] if scales else None,
        scale_drops_at=drops,
        skipped_at=skipped_at,
    )
    late_drops, late_skips = (
        [i for i in drops if i > settle],
        [i for i in skipped_at if i > settle],
    )
    if late_drops:
        problems.append(
            f"the GradScaler scale fell at iteration(s) {compact(late_drops)}, after the first {settle}"
        )
    if late_skips:
        problems.append(
            f"steps skipped at iteration(s) {compact(late_skips)}, after the first {settle}"
        )
    return numbers, problems


def number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compact(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1..3, 7`` (iteration lists in messages)."""
    runs, out = [], []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    for a, b in runs:
        out.append(str(a) if a == b else f"{a}..{b}")
    return ", ".join(out) or "none"


def steady_images_per_s(rows: list[dict], skip_first: int = 3) -> float | None:
    """Median images/s of the logged windows after the first ``skip_first`` (warm-up, cuDNN autotuning)."""
    values = [r["images_per_s"] for r in rows[skip_first:]] or [
        r["images_per_s"] for r in rows[-1:]
    ]
    return statistics.median(values) if values else None


def channels_last_report(state: dict) -> dict:
    """How many 4-D float tensors of a state dict are channels_last. A tensor with 1x1 kernels or one
    input channel is both layouts at once; ``strict`` counts those that are only channels_last."""
    import torch

    four_d = {k: v for k, v in state.items() if v.ndim == 4 and v.is_floating_point()}
    cl = [
        k
        for k, v in four_d.items()
        if v.is_contiguous(memory_format=torch.channels_last)
    ]
    strict = [k for k in cl if not four_d[k].is_contiguous()]
    return {
        "tensors_4d": len(four_d),
        "channels_last": len(cl),
        "only_channels_last": len(strict),
        "not_channels_last": [k for k in four_d if k not in cl][:5],
    }


def parameter_change(before: dict, after: dict, names: list[str]) -> dict:
    """Which of the parameters ``names`` differ between two state dicts, and by how much (median of
    ``|after - before| / |before|`` over the tensors)."""
    import torch

    changed, rel = [], []
    for name in names:
        a, b = before[name].float(), after[name].float()
        if not torch.equal(a, b):
            changed.append(name)
        rel.append(float((b - a).norm() / a.norm().clamp_min(1e-12)))
    unchanged = [n for n in names if n not in changed]
    return {
        "changed": len(changed),
        "parameters": len(names),
        "unchanged": unchanged[:5],
        "median_relative_change": statistics.median(rel) if rel else 0.0,
    }


# --- running the project ---------------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes of the check: full-size SSD300 on a GPU, a tiny model in the CPU rehearsal."""

    iters: int = 30
    batch: int = 32
    train_images: int = 200
    val_images: int = 50
    size: int = 300
    workers: int = 8
    resume_iters: int = 10  # iterations the resumed run adds


REHEARSAL = Settings(
    iters=4, batch=8, train_images=16, val_images=8, size=64, workers=0, resume_iters=2
)


class Check:
    """Where everything goes, how the project is called, and what earlier steps found."""

    def __init__(self, out: Path, cpu: bool, settings: Settings):
        self.out, self.cpu, self.s = out, cpu, settings
        self.device = "cpu" if cpu else "cuda"
        self.shapes = out / "shapes"
        self.config = out / "ssd300_shapes.yaml"
        self.init = out / "init.pt"
        self.param_names: list[str] = []  # filled by the data step
        # steady images/s of each training step (compile's speedup over eager fp16)
        self.images_per_s: dict[str, float] = {}
        self.gpu_name, self.gpus = "", 0  # filled by the cuda step

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def env(self, **extra: str) -> dict:
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SSD_CACHE_DIR": str(self.out / "cache"),
            **extra,
        }

    def call(self, name: str, command: list[str], timeout: float, **env: str) -> Path:
        """Run ``command`` in the repository root, output to OUT/logs/NAME.log; Failed unless it exits 0."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            try:
                proc = subprocess.run(
                    command,
                    check=False,
                    cwd=REPO,
                    env=self.env(**env),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                raise Failed(
                    f"no result after {timeout:.0f} s (killed); log: {log}"
                ) from None
        if proc.returncode != 0:
            raise Failed(f"exit code {proc.returncode}: {log_error(log)} (log: {log})")
        return log

    def ssd(self, name: str, args: list[str], timeout: float = 300, **env: str) -> Path:
        return self.call(name, [sys.executable, "-m", "ssd", *args], timeout, **env)

    def train(
        self,
        name: str,
        overrides: list[str],
        timeout: float = 300,
        resume: bool = False,
        **env: str,
    ) -> tuple[Path, list[dict]]:
        """``ssd train`` of the check's config into OUT/runs/NAME; returns the run folder and its loss rows."""
        run = self.run_dir(name)
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
        self.ssd(
            name,
            [
                "train",
                str(self.config),
                "--output-dir",
                str(run),
                *overrides,
                *(["--resume"] if resume else []),
            ],
            timeout,
            **env,
        )
        return run, loss_rows(run)

    def mfu(self, images_per_s: float | None) -> float | None:
        """Model FLOP utilisation of a training loop, as ``ssd bench`` counts it (ssd/bench/cuda.py:
        3 x the SSD300 forward's 69.7 GFLOP per image over the GPU's dense bf16 peak); None on the
        CPU, for an unknown GPU, or where the bench module is missing."""
        if self.cpu or not images_per_s:
            return None
        try:
            from ssd.bench.cuda import peak_bf16_tflops, train_tflops
        except ImportError:
            return None
        peak = peak_bf16_tflops(self.gpu_name)
        return train_tflops(images_per_s) / peak if peak else None


def log_error(log: Path) -> str:
    """The line of a log that says what went wrong (the exception or ``ssd ...: error``), with the
    innermost frame inside this checkout's ssd/ when there is a traceback."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    pattern = r"^([\w.]+(Error|Exception)\b|ssd [\w-]+: |Traceback)"
    errors = [
        ln for ln in lines if re.match(pattern, ln) and not ln.startswith("Traceback")
    ]
    message = errors[-1] if errors else (lines[-1] if lines else "empty log")
    frames = [re.match(r'^File "([^"]+)", line (\d+)', ln) for ln in lines]
    ours = [
        f"{Path(m[1]).relative_to(REPO)}:{m[2]}"
        for m in frames
        if m and Path(m[1]).is_relative_to(REPO / "ssd")
    ]
    return message[:400] + (f" at {ours[-1]}" if ours else "")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def loss_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def load_state(path: Path) -> dict:
    """A checkpoint read as ``ssd`` reads it: CPU tensors with the strides they were saved with."""
    from ssd.checkpoint import load_checkpoint

    if not path.exists():
        raise Skipped(f"needs {path}, which an earlier step did not write")
    return load_checkpoint(path)


def check_config(check: Check) -> dict:
    """The paper's SSD300 recipe (configs/ssd300_vgg16_voc0712.yaml) on the shapes data: 4 classes,
    no ImageNet backbone (model.init: the same random weights for every run), short and silent."""
    import yaml

    from ssd.data.shapes import SHAPES_CLASSES

    cfg = yaml.safe_load((REPO / "configs" / "ssd300_vgg16_voc0712.yaml").read_text())
    cfg["model"].pop("init_backbone", None)
    cfg["model"].update(
        num_classes=len(SHAPES_CLASSES) + 1, **(TINY_MODEL if check.cpu else {})
    )
    cfg["data"] = {"num_workers": check.s.workers}
    for split in ("train", "val"):  # a list each: no YAML anchors in the written config
        data = {
            "format": "voc",
            "root": str(check.shapes),
            "classes": list(SHAPES_CLASSES),
        }
        cfg["data"][split] = {**data, "split": split}
    cfg["train"].update(
        max_iter=check.s.iters,
        batch_size=check.s.batch,
        device=check.device,
        log_period=1,
        eval_period=10**6,
        checkpoint_period=10**6,
        tensorboard=False,
    )
    cfg["eval"] = {"metric": "voc07", "batch_size": check.s.batch}
    return cfg


# --- the steps ---------------------------------------------------------------------------------------


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
        except Exception as e:  # noqa: BLE001  (any import error is the finding)
            problems.append(f"import {module}: {type(e).__name__}: {e}")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        numbers.update(
            torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
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
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
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
        return (
            out.stdout.strip().splitlines()[0]
            if out.returncode == 0 and out.stdout.strip()
            else None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def step_cuda(check: Check) -> dict:
    """A GPU is there and computes: an fp32 matmul (TF32 off) agrees with the CPU's."""
    import torch

    if not torch.cuda.is_available():
        raise Failed(
            f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU"
        )
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
            }
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
        raise Failed(
            f"an fp32 matmul on the GPU differs from the CPU's by {diff:.3g}", numbers
        )
    return numbers


class tf32_off:
    """TF32 off for matmuls and cuDNN convolutions inside the block (full fp32 on Ampere and newer)."""

    def __enter__(self):
        import torch

        self.saved = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
            self.saved
        )


def step_data(check: Check) -> dict:
    """The shapes dataset, the run config (OUT/ssd300_shapes.yaml) and OUT/init.pt, the random
    weights every training run starts from (model.init), so parameter changes can be measured."""
    import torch
    import yaml

    from ssd.checkpoint import make_checkpoint, save_checkpoint
    from ssd.config import ModelConfig, from_dict
    from ssd.data.shapes import SHAPES_CLASSES, ensure_shapes
    from ssd.model import build_ssd

    ensure_shapes(
        check.shapes,
        check.s.train_images,
        check.s.val_images,
        size=check.s.size,
        seed=0,
    )
    cfg = check_config(check)
    model_cfg = from_dict(ModelConfig, cfg["model"], "model")
    torch.manual_seed(0)
    model = build_ssd(model_cfg)
    save_checkpoint(
        make_checkpoint(model.state_dict(), model_cfg, SHAPES_CLASSES, "train"),
        check.init,
    )
    check.param_names = [name for name, _ in model.named_parameters()]
    cfg["model"]["init"] = str(check.init)
    check.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    params = sum(p.numel() for p in model.parameters())
    return {
        "train_images": check.s.train_images,
        "val_images": check.s.val_images,
        "size": check.s.size,
        "parameters": params,
        "priors": int(model.priors.shape[0]),
        "config": str(check.config),
        "summary": f"{check.s.train_images} + {check.s.val_images} images at {check.s.size} px; "
        f"{model_cfg.arch} {model_cfg.input_size} px, {params / 1e6:.1f} M parameters",
    }


def verify_run(
    check: Check,
    name: str,
    run: Path,
    rows: list[dict],
    expected: list[int],
    scaler: bool,
    before: dict | None = None,
    settle: int = SETTLE,
) -> dict:
    """The checks every training step shares: rows (:func:`analyse_rows`), parameters changed from
    ``before`` (default: init.pt), weights channels_last in last.pt; numbers for the table."""
    numbers, problems = analyse_rows(rows, expected, scaler, settle)
    state = load_state(run / "last.pt")["model"]
    if not check.param_names:
        raise Skipped("needs the data step (init.pt and the parameter names)")
    before = before if before is not None else load_state(check.init)["model"]
    change = parameter_change(before, state, check.param_names)
    layout = channels_last_report(state)
    numbers.update(parameters_changed=change, weights=layout)
    if change["changed"] < change["parameters"]:
        problems.append(
            f"{change['parameters'] - change['changed']} of {change['parameters']} parameters never changed, "
            f"e.g. {', '.join(change['unchanged'])}"
        )
    if (
        layout["channels_last"] < layout["tensors_4d"]
        or not layout["only_channels_last"]
    ):
        problems.append(
            f"last.pt weights are not channels_last ({layout['channels_last']} of {layout['tensors_4d']} "
            f"4-D tensors; e.g. {', '.join(layout['not_channels_last'])})"
        )
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "map" in r]
    ips = steady_images_per_s(rows)
    check.images_per_s[name] = ips or 0.0
    numbers.update(
        images_per_s=ips,
        eval_map=evals[-1]["map"] if evals else None,
        mfu=check.mfu(ips),
    )
    scale = ""
    if numbers.get("grad_scale_last") is not None:
        scale = (
            f", scale {numbers['grad_scale_first']:g}->{numbers['grad_scale_last']:g}"
        )
    numbers["summary"] = (
        f"{numbers['iterations']} its, loss {number(numbers['loss_first'])}->"
        f"{number(numbers['loss_last'])}{scale}, {numbers['skipped']} skipped, "
        f"{change['changed']}/{change['parameters']} params moved, {ips or 0:.0f} img/s"
        + (f", MFU {numbers['mfu']:.1%}" if numbers["mfu"] else "")
    )
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers


def step_fp16_channels_last(check: Check) -> dict:
    """fp16 autocast + GradScaler + channels_last: finite losses, the scale settles, parameters move."""
    run, rows = check.train("fp16", ["train.amp=fp16", "train.channels_last=true"])
    return verify_run(
        check,
        "fp16",
        run,
        rows,
        list(range(1, check.s.iters + 1)),
        scaler=not check.cpu,
    )


def step_bf16(check: Check) -> dict:
    """bf16 autocast (no GradScaler), channels_last by default: finite losses, nothing skipped."""
    run, rows = check.train("bf16", ["train.amp=bf16"])
    return verify_run(
        check, "bf16", run, rows, list(range(1, check.s.iters + 1)), scaler=False
    )


def step_resume(check: Check) -> dict:
    """``--resume`` of a copy of the fp16 run on the GPU for a few more iterations: the rows go on where
    they stopped, the GradScaler state comes back (the scale neither restarts nor falls), weights move."""
    src, run = check.run_dir("fp16"), check.run_dir("resume")
    saved = load_state(src / "last.pt")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src, run)
    end = check.s.iters + check.s.resume_iters
    run, rows = check.train(
        "resume",
        ["train.amp=fp16", "train.channels_last=true", f"train.max_iter={end}"],
        resume=True,
    )
    new = [r for r in rows if r["iter"] > check.s.iters]
    problems = []
    if [r["iter"] for r in rows] != list(range(1, end + 1)):
        problems.append(
            f"metrics.jsonl after the resume logs iterations {compact([r['iter'] for r in rows])}, expected 1..{end}"
        )
    saved_scale = saved.get("scaler", {}).get("scale")
    if (
        not check.cpu
        and new
        and saved_scale is not None
        and new[0].get("grad_scale") != saved_scale
    ):
        problems.append(
            f"the resumed GradScaler scale is {new[0].get('grad_scale')}, last.pt saved {saved_scale}"
        )
    try:  # the resumed steps continue a settled run: no scale drop and no skip at all
        numbers = verify_run(
            check,
            "resume",
            run,
            new,
            list(range(check.s.iters + 1, end + 1)),
            scaler=not check.cpu,
            before=saved["model"],
            settle=check.s.iters,
        )
    except Failed as e:
        numbers, problems = e.numbers, problems + [str(e)]
    numbers.update(
        resumed_at=saved.get("iteration"),
        saved_scale=saved_scale,
        loss_before=saved_loss(rows, check.s.iters),
    )
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers


def saved_loss(rows: list[dict], iteration: int) -> float | None:
    return next((r["loss"] for r in rows if r["iter"] == iteration), None)


def step_cpu_load(check: Check) -> dict:
    """The fp16 run's last.pt in a process that sees no GPU: it loads, builds and predicts finite outputs."""
    path = check.run_dir("fp16") / "last.pt"
    if not path.exists():
        raise Skipped(f"needs {path} (the fp16_channels_last step)")
    log = check.call(
        "cpu_load",
        [sys.executable, str(Path(__file__).resolve()), "--load-on-cpu", str(path)],
        300,
        CUDA_VISIBLE_DEVICES="",
    )
    result = json.loads(log.read_text().strip().splitlines()[-1])
    problems = [
        text
        for bad, text in [
            (result["cuda_available"], "CUDA was visible"),
            (not result["finite"], "non-finite outputs"),
            (result["devices"] != ["cpu"], f"parameters on {result['devices']}"),
        ]
        if bad
    ]
    result["summary"] = (
        f"iteration {result['iteration']}, {result['tensors']} tensors "
        f"({result['channels_last_in_file']} channels_last in the file), outputs finite: {result['finite']}"
    )
    if problems:
        raise Failed("; ".join(problems), result)
    return result


def load_on_cpu(path: str) -> int:
    """``--load-on-cpu CKPT`` (run by :func:`step_cpu_load` with CUDA hidden): print one JSON line."""
    import torch

    from ssd.checkpoint import model_from_checkpoint

    model, ckpt = model_from_checkpoint(path)
    model.eval()
    size = int(model.input_size)
    with torch.no_grad():
        out = model(
            torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        )
    print(
        json.dumps(
            {
                "cuda_available": torch.cuda.is_available(),
                "iteration": ckpt.get("iteration"),
                "tensors": len(ckpt["model"]),
                "channels_last_in_file": channels_last_report(ckpt["model"])[
                    "only_channels_last"
                ],
                "devices": sorted({str(p.device) for p in model.parameters()}),
                "finite": all(bool(torch.isfinite(v).all()) for v in out.values()),
            }
        )
    )
    return 0


def ssd_without_tf32(argv: list[str]) -> int:
    """``--ssd-no-tf32 ARGS``: ``ssd ARGS`` with TF32 off (full fp32 matmuls and convolutions)."""
    from ssd.cli import main

    with tf32_off():
        return main(argv)


def step_eval_gpu_vs_cpu(check: Check) -> dict:
    """``ssd eval`` of the fp16 run's last.pt on the GPU (fp32: train.amp=none, TF32 off) and on
    the CPU: the same VOC07 mAP to 1e-4; the detections themselves are compared too."""
    weights = check.run_dir("fp16") / "last.pt"
    if not weights.exists():
        raise Skipped(f"needs {weights} (the fp16_channels_last step)")
    gpu = run_eval(check, "gpu", weights, check.device, NVIDIA_TF32_OVERRIDE="0")
    cpu = run_eval(check, "cpu", weights, "cpu", CUDA_VISIBLE_DEVICES="")
    numbers = compare_evals(gpu, cpu)
    train_evals = [
        r for r in read_jsonl(check.run_dir("fp16") / "metrics.jsonl") if "map" in r
    ]
    numbers["map_training_eval"] = train_evals[-1]["map"] if train_evals else None
    numbers["summary"] = (
        f"mAP {check.device.upper()} {gpu['map']:.5f} vs CPU {cpu['map']:.5f} "
        f"(diff {numbers['map_diff']:.1e}); {numbers['detections'][0]} vs "
        f"{numbers['detections'][1]} detections, top-10 scores within "
        f"{numbers['top_score_max_diff']:.1e}"
    )
    if (
        numbers["map_diff"] > MAP_TOLERANCE
        or numbers["per_class_max_diff"] > MAP_TOLERANCE
    ):
        raise Failed(
            f"mAP differs by {numbers['map_diff']:.2e} (per class up to "
            f"{numbers['per_class_max_diff']:.2e}), more than {MAP_TOLERANCE:g}",
            numbers,
        )
    return numbers


def run_eval(check: Check, label: str, weights: Path, device: str, **env: str) -> dict:
    """``ssd eval`` with TF32 off and train.amp=none (fp32) into OUT/eval/LABEL: its metrics
    JSON plus ``dets`` (the detections.json list)."""
    out = check.out / "eval" / label
    shutil.rmtree(out, ignore_errors=True)
    args = ["eval", str(check.config), "--weights", str(weights), "--device", device]
    args += [
        "--json",
        str(out / "metrics.json"),
        "--out-dir",
        str(out),
        "train.amp=none",
    ]
    me = str(Path(__file__).resolve())
    check.call(
        f"eval_{label}", [sys.executable, me, "--ssd-no-tf32", *args], 300, **env
    )
    result = json.loads((out / "metrics.json").read_text())
    result["dets"] = json.loads((out / "detections.json").read_text())
    return result


def compare_evals(a: dict, b: dict, top: int = 10) -> dict:
    """Two :func:`run_eval` results: mAP and per-class AP differences, detection counts, and the
    largest difference between the ``top`` highest scores of an image (rank by rank)."""
    per_class = [
        abs((a["per_class"][k] or 0) - (b["per_class"][k] or 0)) for k in a["per_class"]
    ]
    scores = [{}, {}]
    for side, dets in zip(scores, (a["dets"], b["dets"])):
        for d in dets:
            side.setdefault(d["image_id"], []).append(d["score"])
    diffs, count_differs = [0.0], []
    for image in sorted(set(scores[0]) | set(scores[1])):
        sa = sorted(scores[0].get(image, []), reverse=True)
        sb = sorted(scores[1].get(image, []), reverse=True)
        if len(sa) != len(sb):
            count_differs.append(image)
        diffs += [abs(x - y) for x, y in zip(sa[:top], sb[:top])]
    return {
        "map": [a["map"], b["map"]],
        "map_diff": abs(a["map"] - b["map"]),
        "per_class_max_diff": max(per_class, default=0.0),
        "detections": [len(a["dets"]), len(b["dets"])],
        "images_with_other_counts": len(count_differs),
        "top_score_max_diff": max(diffs),
    }


def step_sync_debug(check: Check) -> dict:
    """``train.sync_debug``: steady-state steps (between log steps) run under
    ``torch.cuda.set_sync_debug_mode("error")``; any host-device sync in them fails the run."""
    period = 10 if check.s.iters >= 20 else 2
    run, rows = check.train(
        "sync_debug", ["train.sync_debug=true", f"train.log_period={period}"]
    )
    expected = list(range(period, check.s.iters + 1, period))
    return verify_run(
        check, "sync_debug", run, rows, expected, scaler=True, settle=period
    )


def step_compile(check: Check) -> dict:
    """``train.compile`` (mode default) with fp16 + channels_last: the same checks as eager, and the
    first step's time (mostly compilation) and the steady speed against eager fp16."""
    run, rows = check.train("compile", ["train.compile=true"], timeout=480)
    numbers = verify_run(
        check,
        "compile",
        run,
        rows,
        list(range(1, check.s.iters + 1)),
        scaler=not check.cpu,
    )
    eager = check.images_per_s.get("fp16")
    numbers.update(
        first_step_s=rows[0]["time"] if rows else None,
        speedup_vs_eager=numbers["images_per_s"] / eager if eager else None,
    )
    return numbers


def step_bench(check: Check) -> dict:
    """``ssd bench --device cuda``: train_step (bf16 and fp16 vs torchvision), predict, train_loop (+ MFU)."""
    out = check.out / "bench.json"
    out.unlink(missing_ok=True)
    rows = "train_step predict train_loop"
    args = shlex.split(f"bench --device cuda --only {rows} --repeats 5 --json {out}")
    check.ssd("bench", args, 300)
    rows = json.loads(out.read_text())
    kept = [
        {k: v for k, v in r.items() if k == "name" or isinstance(v, (int, float))}
        for r in rows
    ]
    summary = ", ".join(bench_cell(r) for r in rows)
    return {"rows": kept, "json": str(out), "summary": summary}


def bench_cell(row: dict) -> str:
    """``name 12.3 ms (1.40x)`` of a bench row; a row without a peer shows its MFU if it has one."""
    cell = f"{row.get('name')} {row.get('ours_s', math.nan) * 1e3:.1f} ms"
    if row.get("speedup") is not None:
        return f"{cell} ({row['speedup']:.2f}x)"
    return f"{cell} (MFU {row['mfu']:.1%})" if row.get("mfu") is not None else cell


def step_nccl_2gpu(check: Check) -> dict:
    """Two processes on two GPUs (NCCL): SyncBatchNorm, precise BN before each evaluation, 2 loader
    workers per rank; losses finite, evaluations at 10 and 20, BN statistics finite."""
    import yaml

    if check.gpus < 2:
        raise Skipped(f"{check.gpus} GPU here: the 2-process NCCL run needs 2 or more")
    cfg = yaml.safe_load(check.config.read_text())
    # BN in every block; init.pt has no BN tensors
    cfg["model"].update(batch_norm="all", init=None)
    config = check.out / "ssd300_bn_shapes.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = check.run_dir("nccl_2gpu")
    shutil.rmtree(run, ignore_errors=True)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
    ]
    args = shlex.split(
        f"-m ssd train {config} --output-dir {run} train.bn=sync train.precise_bn_batches=2 "
        "train.precise_bn_before_eval=true data.num_workers=2 train.max_iter=20 "
        "train.eval_period=10 train.log_period=5"
    )
    log = check.call("nccl_2gpu", [*torchrun, *args], 420)
    numbers, problems = analyse_rows(
        loss_rows(run), [5, 10, 15, 20], scaler=True, settle=10
    )
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "map" in r]
    running = [
        v
        for k, v in load_state(run / "last.pt")["model"].items()
        if k.endswith("running_var")
    ]
    numbers.update(
        evals_at=[r["iter"] for r in evals],
        maps=[r["map"] for r in evals],
        bn_layers=len(running),
    )
    if [r["iter"] for r in evals] != [10, 20] or not all(
        math.isfinite(m) for m in numbers["maps"]
    ):
        problems.append(
            f"evaluations at {numbers['evals_at']} with mAP {numbers['maps']}, expected finite ones at 10 and 20"
        )
    if "precise BN at iteration 10" not in log.read_text():
        problems.append(
            "no 'precise BN at iteration 10' in the log (precise_bn_before_eval)"
        )
    if not running or not all(bool(v.isfinite().all()) for v in running):
        problems.append(
            f"BN running variances missing or non-finite ({len(running)} layers)"
        )
    numbers["summary"] = (
        f"2 ranks, {numbers['iterations']} logged, mAP {numbers['maps']}, {len(running)} BN layers"
    )
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers


def step_pytest_cuda(check: Check) -> dict:
    """``pytest -m cuda tests/test_cuda.py``: the same paths on a tiny model, in pytest."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q"]
    try:
        log = check.call("pytest_cuda", [*command, "-p", "no:cacheprovider"], 600)
    except Failed as e:
        log = check.out / "logs" / "pytest_cuda.log"
        raise Failed(f"{last_line(log)} ({e})") from None
    return {"summary": last_line(log)}


def last_line(path: Path) -> str:
    lines = (
        path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    )
    return lines[-1] if lines else ""


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


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [s.name for s in STEPS]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        default="runs/gpu_check",
        help="output folder: gpu_check.json, logs/, runs/ (default runs/gpu_check)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=names,
        metavar="STEP",
        help="run only these steps (and environment, cuda, data)",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        choices=names,
        default=[],
        metavar="STEP",
        help="leave these steps out",
    )
    p.add_argument(
        "--pytest",
        action="store_true",
        help="also run pytest -m cuda tests/test_cuda.py at the end (a few minutes)",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="rehearse the check on the CPU with a tiny model (CUDA-only steps skipped)",
    )
    p.add_argument(
        "--iters",
        type=int,
        help="training iterations per run (default 30; 4 with --cpu)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the steps and what each checks, then exit",
    )
    p.add_argument(
        "--show",
        action="store_true",
        help="print the table of OUT/gpu_check.json (e.g. of a cut-off run)",
    )
    return p.parse_args(argv)


def plan(step: Step, args: argparse.Namespace, blocked: str | None) -> str | None:
    """None when ``step`` runs, else why it is skipped (recorded as such)."""
    if blocked and step.name not in ("environment", "cuda"):
        return blocked
    if step.name in args.skip:
        return "left out (--skip)"
    if args.cpu and step.cuda_only:
        return "needs CUDA (CPU rehearsal)"
    if args.cpu and step.name == "compile" and not args.only:
        return "minutes on a CPU: run it with --only compile (CPU rehearsal)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if (
        str(REPO) not in sys.path
    ):  # ssd from this checkout, even when it is not installed
        sys.path.append(str(REPO))
    # internal entry points of the subprocesses (before argparse: ssd's own options follow)
    if argv[:1] == ["--ssd-no-tf32"]:
        return ssd_without_tf32(argv[1:])
    if argv[:1] == ["--load-on-cpu"]:
        return load_on_cpu(argv[1])
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.list:
        for step in STEPS:
            print(f"{step.name:<20} {' '.join((step.fn.__doc__ or '').split())}")
        return 0
    if args.show:
        print(
            format_table(
                json.loads((out / "gpu_check.json").read_text()), out / "gpu_check.json"
            )
        )
        return 0
    settings = REHEARSAL if args.cpu else Settings()
    if args.iters:
        settings = Settings(**{**asdict(settings), "iters": args.iters})
    check = Check(out, args.cpu, settings)
    meta = {"argv": argv, "settings": asdict(settings), "rehearsal_on_cpu": args.cpu}
    report = Report(out / "gpu_check.json", meta)
    # a time limit's SIGTERM: the running step is recorded as interrupted
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        run_steps(check, report, args)
        code = 0
    except KeyboardInterrupt:
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.finish()
    print("\n" + report.table())
    return code or (1 if report.failed else 0)


def run_steps(check: Check, report: Report, args: argparse.Namespace) -> None:
    """Run or skip each step in order, printing one line per step as it ends."""
    blocked = None
    for step in STEPS:
        if args.only:
            wanted = step.name in args.only or step.name in ALWAYS
        else:
            wanted = not step.optional or args.pytest
        if not wanted:
            continue
        reason = plan(step, args, blocked)
        rec = (
            report.skip(step.name, reason)
            if reason
            else report.run(step.name, step.fn, check)
        )
        print(
            f"gpu_check: {step.name} {rec['status']}: {rec['error'] or rec['summary']}",
            flush=True,
        )
        if step.name == "cuda" and rec["ok"] is False:
            blocked = "no CUDA device"
            print("gpu_check: no CUDA device; the GPU steps are skipped", flush=True)


def interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
