"""The BatchNorm study (``scripts/bn_study.py``): train one detector several times, varying only BN and the lr.

Every variant uses the same config, seed, data, optimizer and iteration count; only ``model.batch_norm``
and ``train.lr`` change. Outputs in the study folder:

- ``runs/<variant>/``: each training run (config.yaml, last.pt, best.pt, metrics.jsonl);
- ``loss.png`` (training loss vs iteration), ``map.png`` (validation mAP vs iteration);
- ``lr_sweep.png``: final mAP vs lr (log axis), one line per BN placement, diverged runs marked;
- ``activations.png``: histograms of the values entering the ReLU of the last conv of each feature
  block (conv1..conv5, fc7, the first extra block) and of the first source's class logits, at the start
  (the init weights) and at the end (``last.pt``) of training, on one fixed batch of training images;
  one row per variant;
- ``summary.json`` (everything above as numbers) and ``summary.md`` (the table).

Reading order: :func:`parse_variant`, then :func:`run_study`, which prepares the data and the fixed
batch (:mod:`ssd.studies.bn_study_data`), calls :func:`run_variant` per variant (which measures with
:mod:`ssd.studies.bn_study_activations`), then summarises and plots (:mod:`ssd.studies.bn_study_report`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ssd.checkpoint import load_checkpoint, load_state_strict
from ssd.config import BN_ALL, BN_BLOCKS, Config, DatasetConfig, load_config
from ssd.data.transforms import normalize_batch
from ssd.engine.step import TrainingError
from ssd.engine.train import train
from ssd.model import build_ssd
from ssd.studies.bn_study_activations import histograms, preactivations, start_model
from ssd.studies.bn_study_data import ensure_study_data, fixed_batch, val_subset
from ssd.studies.bn_study_report import format_table, require_pyplot, summarize, write_plots

__all__ = ["DEFAULT_VARIANTS", "VARIANT_HELP", "Variant", "parse_variant", "run_study", "run_variant", "val_subset"]

log = logging.getLogger("ssd.bn_study")

BN_PRESETS = {"none": [], "all": list(BN_ALL), "backbone": [b for b in BN_ALL if b != "extras"], "extras": ["extras"]}
# The default run asks ScratchDet's question (Zhu et al. 2019, Sec. 4.1, Table 1: BN in the backbone and
# the head lets SSD train from scratch at SGD lrs up to 0.05, where the BN-free network diverges): SGD at
# absolute lrs 0.01 / 0.04 / 0.16 for no BN, BN in every feature block, and BN in the heads as well,
# plus the BN-free network at 0.002. Exploratory 200-iteration runs on the CPU demo (seed 0): no BN
# gave NaN losses at every lr >= 0.01 (at iterations 70 / 22 / 13); `all` rebounded 3.6x / 9.8x and
# blew up at 0.16 (backbone pre-activation std 60); `all+heads` fell smoothly at all three (loss 7.8 /
# 6.2 / 5.9). The BN-free runs stop early, so the nine variants cost about seven full runs.
DEFAULT_VARIANTS = [
    "none@lr0.002",
    "none@lr0.01",
    "none@lr0.04",
    "all@lr0.01",
    "all@lr0.04",
    "all@lr0.16",
    "all+heads@lr0.01",
    "all+heads@lr0.04",
    "all+heads@lr0.16",
]
DEFAULT_OPTIMIZER = "sgd"  # the default variants' lrs are SGD lrs; None: the config's train.optimizer


@dataclass
class Variant:
    """``blocks`` get BatchNorm; the run trains at ``lr`` when set, else at ``lr_mult`` times the base lr
    (the config's ``train.lr`` or the study's ``--lr``)."""

    name: str
    blocks: list[str]
    lr_mult: float = 1.0
    lr: float | None = None

    def lr_for(self, base_lr: float) -> float:
        return self.lr if self.lr is not None else base_lr * self.lr_mult

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", re.sub("@(lr)?", "_lr", self.name))


VARIANT_HELP = (
    "a variant is BLOCKS[@LR]: BLOCKS is a preset (none, all = every feature block, backbone = conv1..conv5 + fc, "
    "extras) or a BN block ({blocks}), several joined by '+' (all+heads, backbone+heads, conv4+conv5); "
    "LR is a multiple of the base lr (@3x, @0.5x) or an absolute lr (@lr0.05)"
)


def parse_variant(spec: str) -> Variant:
    """``BLOCKS[@LR]``, see :data:`VARIANT_HELP`: ``all+heads@3x``, ``none@lr0.002``, ``conv4+conv5``."""
    spec = spec.strip()
    blocks_spec, at, lr_spec = spec.partition("@")
    help_text = VARIANT_HELP.format(blocks=", ".join(BN_BLOCKS))
    chosen: set[str] = set()
    for token in blocks_spec.split("+"):
        if token == "none" and blocks_spec != "none":
            raise ValueError(f"variant {spec!r}: 'none' cannot be combined with other blocks; {help_text}")
        if token not in BN_PRESETS and token not in BN_BLOCKS:
            raise ValueError(f"variant {spec!r}: unknown BN block {token!r}; {help_text}")
        chosen |= set(BN_PRESETS.get(token, [token]))
    lr_mult, lr = 1.0, None
    if at:
        value = _positive(lr_spec[:-1] if lr_spec.endswith("x") else lr_spec[2:] if lr_spec.startswith("lr") else "")
        if value is None:
            raise ValueError(
                f"variant {spec!r}: after @ write a multiple of the base lr like 3x or 0.5x, or an absolute lr "
                f"like lr0.05 (got {lr_spec!r})"
            )
        lr_mult, lr = (value, None) if lr_spec.endswith("x") else (1.0, value)
    return Variant(spec, [b for b in BN_BLOCKS if b in chosen], lr_mult, lr)


def _positive(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


# --- one run -----------------------------------------------------------------------------------------


# Variants are compared at equal iterations: a config's time limit (the CPU demo has one) would cut slow
# variants short and a time-driven schedule would make the lr depend on the machine's speed, so both are
# lifted (the study's overrides may set them again).
STUDY_DEFAULTS = ["train.time_limit=null", "train.schedule_by_time=false", "train.tensorboard=false"]


def variant_config(
    config_path, overrides: list[str], variant: Variant, base_lr: float, study: list[str], val: DatasetConfig
) -> Config:
    blocks = f"[{', '.join(variant.blocks)}]" if variant.blocks else "none"
    cfg = load_config(
        config_path,
        [*STUDY_DEFAULTS, *overrides, *study, f"model.batch_norm={blocks}", f"train.lr={variant.lr_for(base_lr)!r}"],
    )
    cfg.data.val = val
    return cfg


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """``(training rows, evaluation rows)`` of a run's metrics.jsonl (absent file: none). A training row
    has ``loss`` None when every step of its window was skipped for a non-finite loss."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "loss" in r], [r for r in rows if "map" in r]


def throughput(train_rows: list[dict], batch_size: int) -> float | None:
    """Training images/s over the run, evaluation excluded (the engine's windows), without the first
    window (data-loader start-up)."""
    images = seconds = 0.0
    prev = train_rows[0]["iter"] if train_rows else 0
    for row in train_rows[1:]:
        n = (row["iter"] - prev) * batch_size
        prev = row["iter"]
        if row["images_per_s"] > 0:
            images += n
            seconds += n / row["images_per_s"]
    return images / seconds if seconds > 0 else None


def divergence(error: str | None, skipped: int, losses: list[float]) -> str | None:
    """Why a run counts as diverged, or None: stopped by the engine after ``train.max_bad_steps``
    consecutive non-finite losses; some steps skipped for a non-finite loss; the loss ended above its start."""
    if error is not None:
        return "non-finite loss, stopped"
    if skipped:
        return f"{skipped} non-finite step{'s' * (skipped > 1)} skipped"
    if losses and (not math.isfinite(losses[-1]) or losses[-1] > losses[0]):
        return "loss rose"
    return None


def run_variant(cfg: Config, variant: Variant, out: Path, images: Tensor) -> dict:
    """Train ``cfg`` into ``out`` and measure it. A run stopped by :class:`TrainingError` (non-finite
    loss) is recorded as diverged, not raised."""
    log.info(
        "variant %s: batch_norm %s, %s lr %g, %d iterations -> %s",
        variant.name,
        variant.blocks or "none",
        cfg.train.optimizer,
        cfg.train.lr,
        cfg.train.max_iter,
        out,
    )
    t0, started = time.perf_counter(), time.time()
    error, stopped = None, "diverged"
    try:
        stopped = train(cfg, out)["stopped"]
    except TrainingError as e:
        error = str(e)
        log.warning("variant %s diverged: %s", variant.name, e)
    if stopped == "signal":  # Ctrl-C / SIGTERM: the engine saved last.pt and returned; the study stops too
        raise KeyboardInterrupt(f"variant {variant.name} interrupted; its state is in {out / 'last.pt'}")
    wall = time.perf_counter() - t0
    rows, eval_rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["loss"] is not None]

    x = normalize_batch(images, cfg.model.preprocess)
    start = preactivations(start_model(cfg), x)
    end, end_iter = None, None
    if (out / "last.pt").is_file() and (out / "last.pt").stat().st_mtime >= started - 1:  # not a previous study's
        ckpt = load_checkpoint(out / "last.pt")
        model = build_ssd(cfg.model)
        load_state_strict(model, ckpt["model"], str(out / "last.pt"))
        end, end_iter = preactivations(model, x), int(ckpt.get("iteration", 0))

    losses = [r["loss"] for r in train_rows]
    # in the logged windows: the engine stops before logging its last ones
    skipped = sum(r.get("skipped", 0) for r in rows)
    reason = divergence(error, skipped, losses)
    maps = [r["map"] for r in eval_rows]
    return {
        "name": variant.name,
        "batch_norm": variant.blocks,
        "optimizer": cfg.train.optimizer,
        "lr": cfg.train.lr,
        "lr_mult": variant.lr_mult if variant.lr is None else None,  # None: an absolute lr (@lrVALUE)
        "run_dir": str(out),
        "iterations": train_rows[-1]["iter"] if train_rows else 0,  # the last logged iteration that updated
        "stopped": stopped,  # done | time_limit (train.time_limit set) | diverged
        "final_map": maps[-1] if maps else None,
        "best_map": max(maps) if maps else None,
        "diverged": reason is not None,
        "diverged_reason": reason,
        "skipped_steps": skipped,
        "error": error,
        "start_loss": losses[0] if losses else None,
        "end_loss": losses[-1] if losses else None,
        "images_per_s": throughput(train_rows, cfg.train.batch_size),
        "wall_s": wall,
        "loss_curve": {"iter": [r["iter"] for r in train_rows], "loss": losses},
        "map_curve": {"iter": [r["iter"] for r in eval_rows], "map": maps},
        "end_weights_iter": end_iter,
        "activations": histograms(start, end),
    }


# --- the study -----------------------------------------------------------------------------------------


def run_study(
    config_path: str | os.PathLike,
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    variants: Sequence[str] = tuple(DEFAULT_VARIANTS),
    iters: int = 300,
    eval_period: int = 100,
    log_period: int = 5,
    batch_size: int | None = None,
    val_images: int = 100,
    act_images: int = 16,
    optimizer: str | None = DEFAULT_OPTIMIZER,
    lr: float | None = None,
) -> dict:
    """Run every variant and write the plots, ``summary.json`` and ``summary.md`` into ``out``.
    ``optimizer`` (sgd | adamw; None: the config's) and ``lr`` (the base lr the variants' ``@3x``
    multiply; None: the config's) replace ``train.optimizer`` / ``train.lr``; SGD takes the config's ``train.momentum``
    and ``train.weight_decay`` (0.9 and 5e-4 unless it sets them). Returns the summary (see
    :func:`ssd.studies.bn_study_report.summarize`)."""
    t0 = time.perf_counter()
    for name, value, low in (
        ("--iters", iters, 1),
        ("--eval-period", eval_period, 1),
        ("--log-period", log_period, 1),
        ("--val-images", val_images, 0),
        ("--act-images", act_images, 2),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive number, got {lr}")
    require_pyplot()  # before the training, not after it
    parsed = [parse_variant(v) for v in variants]
    if not parsed:
        raise ValueError("--variants: give at least one variant, e.g. none all all@3x")
    dirs = [v.dirname for v in parsed]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"--variants: duplicate variant in {list(variants)}")
    out = Path(out)
    overrides = list(overrides)
    study = [
        f"train.max_iter={iters}",
        f"train.eval_period={eval_period}",
        f"train.log_period={log_period}",
        f"train.checkpoint_period={eval_period}",
    ]
    if batch_size is not None:
        study.append(f"train.batch_size={batch_size}")
    if optimizer is not None:
        study.append(f"train.optimizer={optimizer}")
    if lr is not None:
        study.append(f"train.lr={lr!r}")
    base = load_config(config_path, [*STUDY_DEFAULTS, *overrides, *study])
    runs: dict[tuple, str] = {}
    for v in parsed:
        key = (tuple(v.blocks), v.lr_for(base.train.lr))
        if key in runs:
            raise ValueError(
                f"--variants: {runs[key]} and {v.name} are the same run (BN {list(v.blocks) or 'none'}, lr {key[1]:g})"
            )
        runs[key] = v.name
    if optimizer is not None and optimizer != (config_optimizer := load_config(config_path, overrides).train.optimizer):
        log.info("every variant trains with %s (the config's train.optimizer is %s)", optimizer, config_optimizer)
    ensure_study_data(base)
    out.mkdir(parents=True, exist_ok=True)
    val = val_subset(base.data.val, val_images, out / "val_subset")
    images = fixed_batch(base, act_images)

    results = []
    for variant in parsed:
        cfg = variant_config(config_path, overrides, variant, base.train.lr, study, val)
        results.append(run_variant(cfg, variant, out / "runs" / variant.dirname, images))
    t = base.train
    summary = summarize(
        results,
        {
            "config": str(config_path),
            "overrides": overrides,
            "iters": iters,
            "batch_size": t.batch_size,
            "optimizer": t.optimizer,
            "base_lr": t.lr,
            "momentum": t.momentum if t.optimizer == "sgd" else None,
            "weight_decay": t.weight_decay,
            "schedule": t.schedule,
            "warmup_iters": t.warmup_iters,
            "warmup_factor": t.warmup_factor,
            "max_bad_steps": t.max_bad_steps,
            "seed": t.seed,
            "eval_period": eval_period,
            "val_images": val_images or None,
            "activation_images": len(images),
            "data": str(base.data.train.root),
            "torch_threads": torch.get_num_threads(),
        },
    )
    summary["plots"] = write_plots(summary, out)
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(format_table(summary) + "\n")
    log.info("BN study done in %.0f s: %s", summary["wall_s"], out)
    return summary
