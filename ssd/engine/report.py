"""The end-of-training report: what held the run back, from what the run measured, and which keys to change.

The verdict is one of, in this order (the first that fits):

- ``data``: the model cannot detect its own training images (training-sample mAP near zero) although the
  loss fell, it had its chance (the loss stopped falling at a high learning rate, or it saw each training
  image many times), and the priors can match the boxes: the labels, classes or boxes do not describe
  the pixels;
- ``priors``: few of the training boxes have a prior they can be matched to, and the training sample
  scores low: the misses are the boxes no prior matches;
- ``underfitting``: the training sample scores low; the loss either stopped falling while the learning
  rate was still high (capacity or input) or was still falling (iterations);
- ``overfitting``: the training sample scores well above validation, by more than noise;
- ``healthy``.

``unknown`` when the run has no evaluation, or no training sample (``eval.train_sample: 0``) to tell
the first four apart. The thresholds come from measured runs and deliberately broken ones
(docs/training.md shows them).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ssd.config import Config
from ssd.data.dataset import DetectionDataset
from ssd.data.records import boxes_per_class
from ssd.engine.eval_table import format_table
from ssd.engine.results_plot import RESULTS_PNG, plot_results
from ssd.priorfit import prior_coverage

log = logging.getLogger("ssd.train")

REPORT = "report.json"
NEAR_ZERO_MAP = 0.05  # training-sample mAP of a model that finds nothing it was shown
LOW_MAP = 0.5  # training-sample mAP below which the model has not learnt its training images
LOW_COVERAGE = 0.6  # fraction of training boxes with a prior at the matching IoU
LOSS_FELL = 0.25  # the loss fell when its last fifth averages this much below its first fifth
FLAT = 0.03  # the loss stopped falling: its last fifth at high lr within 3% of the fifth before
HIGH_LR = 0.5  # "high": at least half the peak learning rate (an annealed tail flattens every run)
WINDOW = 0.2  # the fifths above
MIN_GAP = 0.10  # overfitting: training sample minus validation above this and above 2 standard errors
MIN_WINDOW_ROWS = 2  # rows per fifth for a trend; fewer: no trend
MANY_EPOCHS = 20  # passes over the training images after which a model detects at least some of them


def loss_trend(rows: list[dict]) -> dict:
    """From the logged training rows (``iter``, ``loss``, ``lr``): ``loss_first`` / ``loss_last`` (mean of the
    first / last fifth), ``loss_fell`` (relative fall between them), ``high_lr_change`` (relative fall of the
    last fifth of the rows at >= half the peak lr from the fifth before; None when too few rows)."""
    rows = [r for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not rows:
        return {"loss_first": None, "loss_last": None, "loss_fell": None, "high_lr_change": None}
    losses = np.array([r["loss"] for r in rows])
    k = max(1, round(len(losses) * WINDOW))
    first, last = float(losses[:k].mean()), float(losses[-k:].mean())
    peak = max(r["lr"] for r in rows)
    high = np.array([r["loss"] for r in rows if r["lr"] >= HIGH_LR * peak])
    k = round(len(high) * WINDOW)
    change = None
    if k >= MIN_WINDOW_ROWS:
        before, end = float(high[-2 * k : -k].mean()), float(high[-k:].mean())
        change = (before - end) / before if before > 0 else 0.0
    return {"loss_first": first, "loss_last": last, "loss_fell": (first - last) / first if first > 0 else 0.0,
            "high_lr_change": change}  # fmt: skip


def gap_standard_error(train_map: float, train_boxes: int, val_map: float, val_boxes: int) -> float:
    """The standard error of training-sample mAP minus validation mAP, each taken as a proportion over its
    sample's boxes (the two samples are independent)."""

    def variance(p: float, n: int) -> float:
        return p * (1 - p) / n if n > 0 else 0.25

    return math.sqrt(
        variance(min(max(train_map, 0.0), 1.0), train_boxes) + variance(min(max(val_map, 0.0), 1.0), val_boxes)
    )


def evidence_of(train_rows: list[dict], result: dict | None, coverage: float | None, epochs: float) -> dict:
    """Everything the verdict reads: the last evaluation's numbers, the loss trend, the prior coverage and
    ``epochs``, the passes over the training images the run made."""
    ev: dict = {"prior_coverage": coverage, "epochs": epochs, **loss_trend(train_rows)}
    if result is None:
        return ev
    ev |= {"metric": result["metric"], "iteration": result.get("iter"), "val_map": result["map"],
           "val_boxes": int(sum(result.get("num_gt", {}).values()))}  # fmt: skip
    if "train_sample_map" in result:
        t, v = result["train_sample_map"], result["map"]
        se = gap_standard_error(t, result["train_sample_boxes"], v, ev["val_boxes"])
        ev |= {"train_sample_map": t, "train_sample_boxes": result["train_sample_boxes"], "gap": t - v,
               "gap_standard_error": se}  # fmt: skip
    return ev


def decide(ev: dict) -> tuple[str, str, list[str]]:
    """``(verdict, why, advice)`` from :func:`evidence_of`'s dict."""
    if "val_map" not in ev:
        return "unknown", "the run has no evaluation", ["evaluate it: ssd eval CONFIG --weights RUN/last.pt"]
    cov, t = ev["prior_coverage"], ev.get("train_sample_map")
    low_coverage = cov is not None and cov < LOW_COVERAGE
    change, fell = ev["high_lr_change"], ev["loss_fell"]
    flat = change is not None and change < FLAT
    if t is None:
        if low_coverage:
            return "priors", f"only {cov:.0%} of the training boxes have a prior", PRIORS_ADVICE
        return "unknown", "no training sample to compare with", ["set eval.train_sample (e.g. 200) and train again"]
    had_its_chance = flat or ev["epochs"] >= MANY_EPOCHS
    if t < NEAR_ZERO_MAP and fell is not None and fell >= LOSS_FELL and had_its_chance and not low_coverage:
        how = "then stopped falling" if flat else f"the run saw each training image {ev['epochs']:.0f} times"
        why = f"the training sample scores {t:.3f} although the loss fell {fell:.0%} and {how}"
        return "data", why, DATA_ADVICE
    if low_coverage and t < LOW_MAP:
        return (
            "priors",
            f"only {cov:.0%} of the training boxes have a prior; the training sample scores {t:.3f}",
            (PRIORS_ADVICE),
        )
    if t < LOW_MAP:
        if flat:
            why = f"the training sample scores {t:.3f} and the loss stopped falling while the lr was high"
            return "underfitting", why, CAPACITY_ADVICE + ITERATIONS_ADVICE
        return (
            "underfitting",
            f"the training sample scores {t:.3f} and the loss was still falling",
            (ITERATIONS_ADVICE + CAPACITY_ADVICE),
        )
    gap, se = ev["gap"], ev["gap_standard_error"]
    if gap > max(MIN_GAP, 2 * se):
        why = f"the training sample scores {t:.3f}, validation {ev['val_map']:.3f} (gap {gap:.3f}, 2 SE {2 * se:.3f})"
        return "overfitting", why, OVERFITTING_ADVICE
    return "healthy", f"the training sample scores {t:.3f}, validation {ev['val_map']:.3f}", []


DATA_ADVICE = [
    "ssd data check CONFIG --all: boxes outside their image, empty or mismatched files",
    "check data.train.classes against the label ids (YOLO: the order of data.yaml's names)",
    "draw a few training boxes on their images (ssd data check --all names the files) to see they sit on the objects",
]
PRIORS_ADVICE = [
    "ssd data fit-priors CONFIG: prior sizes (model.priors) and, if sizes are not enough, model.input_size"
]
CAPACITY_ADVICE = ["more capacity: model.width, model.batch_norm (BN in the heads), model.input_size"]
ITERATIONS_ADVICE = ["more iterations: train.max_iter (or train.time_limit)"]
OVERFITTING_ADVICE = [
    "more augmentation (data.augment: crop_min_ious, expand_max_ratio)",
    "fewer iterations (train.max_iter) or keep best.pt",
    "more training images",
]


def build_report(train_rows: list[dict], result: dict | None, coverage: float | None, epochs: float,
                 train_boxes: dict[str, int] | None) -> dict:  # fmt: skip
    """``{"verdict", "why", "evidence", "advice", "per_class"}`` (``per_class``: name -> AP and training boxes)."""
    ev = evidence_of(train_rows, result, coverage, epochs)
    verdict, why, advice = decide(ev)
    per_class = {}
    if result is not None:
        for name, ap in result["per_class"].items():
            ap_value = None if isinstance(ap, float) and math.isnan(ap) else ap
            per_class[name] = {"ap": ap_value, "train_boxes": None if train_boxes is None else train_boxes.get(name)}
    return {"verdict": verdict, "why": why, "evidence": ev, "advice": advice, "per_class": per_class}


def format_report(report: dict) -> str:
    """The lines ``ssd train`` prints at its end."""
    ev = report["evidence"]
    lines = [f"report: {report['verdict']}: {report['why']}"]
    facts = []
    if ev.get("train_sample_map") is not None:
        facts.append(f"training sample {ev['train_sample_map']:.4f} vs validation {ev['val_map']:.4f}")
    if ev.get("prior_coverage") is not None:
        facts.append(f"prior coverage {ev['prior_coverage']:.1%}")
    if ev.get("loss_first") is not None:
        facts.append(f"loss {ev['loss_first']:.3f} -> {ev['loss_last']:.3f}")
    if ev.get("high_lr_change") is not None:
        facts.append(f"fall over the last fifth at high lr {ev['high_lr_change']:.1%}")
    if facts:
        lines.append("  " + "; ".join(facts))
    lines += [f"  - {a}" for a in report["advice"]]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> Path:
    path = out / REPORT
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_rows(metrics: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a resumed run's earlier rows included)."""
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def report_run(
    out: Path, cfg: Config, priors: torch.Tensor, train_set: DetectionDataset, iteration: int, result: dict | None
) -> dict:
    """The report of the run in ``out`` (its metrics.jsonl, the final evaluation ``result``), written to
    ``report.json`` with ``results.png`` beside it, and logged with the per-class table."""
    rows = read_rows(out / "metrics.jsonl")
    assert cfg.model.input_size is not None  # set by ModelConfig.__post_init__
    coverage = prior_coverage(train_set.records, priors, cfg.model.input_size, cfg.loss.iou_threshold)
    train_boxes = boxes_per_class(train_set.records, train_set.classes)
    epochs = iteration * cfg.train.batch_size / max(1, len(train_set))
    report = build_report([r for r in rows if "loss" in r], result, coverage["all"]["recall"], epochs, train_boxes)
    path = write_report(out, report)
    plot_results(rows, out / RESULTS_PNG)
    table = f"\n{format_table(result, train_boxes)}" if result is not None else ""
    log.info("%s%s\n(%s)", format_report(report), table, path)
    return report
