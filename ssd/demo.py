"""``ssd demo``: generate the shapes dataset, train ``configs/shapes_tiny.yaml`` on the CPU, evaluate, draw."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import torch

from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
from ssd.config import Config, load_config
from ssd.data.dataset import read_image
from ssd.data.shapes import ensure_shapes
from ssd.engine.evaluate import build_eval_loader, build_eval_set, predict_loader
from ssd.engine.machine_load import free_cpus
from ssd.engine.train import train
from ssd.postprocess import build_postprocess
from ssd.visualize import draw_detections

log = logging.getLogger("ssd.demo")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes_tiny.yaml"
DEMO_DATA = {"num_train": 2000, "num_val": 300, "size": 160, "seed": 0}  # 160 px: cheap to decode for a 128 px model


def run_demo(out: str | Path, overrides: Sequence[str] = (), num_images: int = 8, data: dict = DEMO_DATA) -> dict:
    """Returns the ``--json`` metrics of ``ssd eval`` (the training's evaluation of ``best.pt``) plus
    ``iterations`` and ``seconds`` (wall time, all steps); ``{"stopped": "SIGINT" | "SIGTERM",
    "iterations": n}`` when a signal stopped the training (the engine logged where ``last.pt`` is)."""
    t0 = time.perf_counter()
    out = Path(out)
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"{DEMO_CONFIG}: the demo config ships with the repository (configs/shapes_tiny.yaml)")
    data_dir = ensure_shapes(out / "data", **data)
    cfg = load_config(DEMO_CONFIG, [f"data.train.root={data_dir}", f"data.val.root={data_dir}", *overrides])
    threads = torch.get_num_threads()
    try:
        fit_threads_to_free_cpus()
        summary = train(cfg, out / "run")
    finally:
        torch.set_num_threads(threads)
    if summary["stopped"] == "signal":  # nothing evaluated: no mAP, no drawn detections
        return {"stopped": summary["signal"] or "SIGTERM", "iterations": summary["iteration"]}
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in rows if "map" in r and r["iter"] == summary["best_iter"])
    metrics = {
        "metric": best["eval"],
        "map": best["map"],
        "per_class": best["per_class"],
        "iterations": summary["iteration"],
        "best_iteration": best["iter"],
        "seconds": time.perf_counter() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    draw_validation_images(cfg, out / "run" / "best.pt", out / "detections", num_images)
    log.info(
        "demo: %s mAP %.4f, %d iterations, %.0f s; detections drawn in %s",
        best["eval"],
        best["map"],
        summary["iteration"],
        metrics["seconds"],
        out / "detections",
    )
    return metrics


def fit_threads_to_free_cpus() -> None:
    """Train with as many threads as CPUs other processes leave free, unless OMP_NUM_THREADS chooses: a
    thread that shares its core with another process holds up the others at every parallel region, so
    fewer threads finish sooner on a busy machine; the iterations, and so the result, stay the same."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    free, busy = free_cpus()
    threads = torch.get_num_threads()
    if busy is not None and free < threads:
        log.warning(
            "other processes keep %.1f CPUs busy: the demo trains with %d thread(s) instead of %d "
            "(OMP_NUM_THREADS chooses); the result is the same, only later",
            busy,
            free,
            threads,
        )
        torch.set_num_threads(free)


def draw_validation_images(cfg: Config, weights: Path, out: Path, count: int) -> None:
    """The first ``count`` validation images with the detections of ``weights`` drawn, as JPEGs in ``out``."""
    model, ckpt = model_from_checkpoint(weights)
    model_cfg = checkpoint_model_config(ckpt, weights)
    val = build_eval_set(cfg, model_cfg)  # the evaluation's data and preprocessing
    val.records = val.records[:count]
    loader = build_eval_loader(val, model_cfg, count, num_workers=0, distributed=False)
    preds = predict_loader(
        model, loader, build_postprocess(cfg.postprocess, model_cfg), model_cfg.preprocess, torch.device("cpu")
    )
    out.mkdir(parents=True, exist_ok=True)
    for rec in val.records:
        d = preds[rec.image_id]
        drawn = draw_detections(
            read_image(rec.path, rec.orientation), d["boxes"], d["scores"], d["labels"], ckpt["classes"]
        )
        cv2.imwrite(str(out / f"{rec.image_id}.jpg"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
