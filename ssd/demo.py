"""``ssd demo``: generate the shapes dataset, train ``configs/shapes_tiny.yaml`` on the CPU, evaluate, draw."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import cv2
import torch

from ssd.checkpoint import model_from_checkpoint
from ssd.config import load_config
from ssd.data.dataset import build_dataset, read_image
from ssd.data.loader import build_dataloader
from ssd.data.shapes import ensure_shapes
from ssd.data.transforms import build_transforms
from ssd.engine.evaluate import evaluate_voc, predict_loader
from ssd.engine.train import train
from ssd.postprocess import build_postprocess
from ssd.visualize import draw_detections

log = logging.getLogger("ssd.demo")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes_tiny.yaml"
DEMO_DATA = {"num_train": 2000, "num_val": 300, "size": 160, "seed": 0}  # 160 px: cheap to decode for a 128 px model


def run_demo(out: str | Path, overrides: list[str] = (), num_images: int = 8) -> dict:
    """Returns the ``--json`` metrics of the evaluation issue plus ``seconds`` (wall time, all steps)."""
    t0 = time.perf_counter()
    out = Path(out)
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"{DEMO_CONFIG}: the demo config ships with the repository (configs/shapes_tiny.yaml)")
    data_dir = ensure_shapes(out / "data", **DEMO_DATA)
    cfg = load_config(DEMO_CONFIG, [f"data.train.root={data_dir}", f"data.val.root={data_dir}", *overrides])
    summary = train(cfg, out / "run")
    model, ckpt = model_from_checkpoint(out / "run" / "best.pt")
    model.eval()
    val = build_dataset(cfg.data.val, build_transforms(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size, False),
                        train=False, key="data.val")  # fmt: skip
    loader = build_dataloader(val, cfg.eval.batch_size, train=False, num_workers=0)
    preds = predict_loader(model, loader, build_postprocess(cfg.postprocess, cfg.model), cfg.model.preprocess, torch.device("cpu"))
    res = evaluate_voc(val, preds, use_07_metric=True)
    metrics = {"metric": "voc07", "map": res["map"], "per_class": res["per_class"], "iterations": summary["iteration"],
               "seconds": time.perf_counter() - t0}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    det_dir = out / "detections"
    det_dir.mkdir(exist_ok=True)
    for rec in val.records[:num_images]:
        d = preds[rec.image_id]
        drawn = draw_detections(read_image(rec.path), d["boxes"], d["scores"], d["labels"], ckpt["classes"])
        cv2.imwrite(str(det_dir / f"{rec.image_id}.jpg"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    log.info("demo: VOC07 mAP %.4f, %d iterations, %.0f s; detections drawn in %s", res["map"], summary["iteration"],
             metrics["seconds"], det_dir)  # fmt: skip
    return metrics
