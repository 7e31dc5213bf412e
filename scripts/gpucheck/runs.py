"""Running the project for a GPU check: its sizes (:class:`Settings`), :class:`Check` (where outputs
go, the ``python -m ssd`` subprocesses with one log each, what earlier steps found), the run config on
the shapes data, and reading back what a run wrote (logs, metrics.jsonl, checkpoints)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .record import Failed, Skipped

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"  # the entry point, also of the check's own subprocesses
# the CPU rehearsal's model: tests/test_train.py's 64 px, width-1/8 SSD with BN in every block
TINY_MODEL = {"input_size": 64, "width": 0.125, "batch_norm": "all"}
TINY_MODEL["extras"] = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}]


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


REHEARSAL = Settings(iters=4, batch=8, train_images=16, val_images=8, size=64, workers=0, resume_iters=2)


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
        return {**os.environ, "PYTHONUNBUFFERED": "1", "SSD_CACHE_DIR": str(self.out / "cache"), **extra}

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
                raise Failed(f"no result after {timeout:.0f} s (killed); log: {log}") from None
        if proc.returncode != 0:
            raise Failed(f"exit code {proc.returncode}: {log_error(log)} (log: {log})")
        return log

    def ssd(self, name: str, args: list[str], timeout: float = 300, **env: str) -> Path:
        return self.call(name, [sys.executable, "-m", "ssd", *args], timeout, **env)

    def train(
        self, name: str, overrides: list[str], timeout: float = 300, resume: bool = False, **env: str
    ) -> tuple[Path, list[dict]]:
        """``ssd train`` of the check's config into OUT/runs/NAME; returns the run folder and its loss rows."""
        run = self.run_dir(name)
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
        self.ssd(
            name,
            ["train", str(self.config), "--output-dir", str(run), *overrides, *(["--resume"] if resume else [])],
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
    errors = [ln for ln in lines if re.match(pattern, ln) and not ln.startswith("Traceback")]
    message = errors[-1] if errors else (lines[-1] if lines else "empty log")
    frames = [re.match(r'^File "([^"]+)", line (\d+)', ln) for ln in lines]
    ours = [f"{Path(m[1]).relative_to(REPO)}:{m[2]}" for m in frames if m and Path(m[1]).is_relative_to(REPO / "ssd")]
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


def eval_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "map" in r]


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
    cfg["model"].update(num_classes=len(SHAPES_CLASSES) + 1, **(TINY_MODEL if check.cpu else {}))
    cfg["data"] = {"num_workers": check.s.workers}
    for split in ("train", "val"):  # a list each: no YAML anchors in the written config
        data = {"format": "voc", "root": str(check.shapes), "classes": list(SHAPES_CLASSES)}
        cfg["data"][split] = {**data, "split": split}
    cfg["train"].update(
        max_iter=check.s.iters,
        batch_size=check.s.batch,
        device=check.device,
        log_period=1,
        freeze=[],  # no ImageNet backbone here: every layer trains (frozen random conv1-2 would teach nothing)
        eval_period=10**6,
        checkpoint_period=10**6,
        tensorboard=False,
    )
    cfg["eval"] = {"metric": "voc07", "batch_size": check.s.batch}
    return cfg


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else ""
