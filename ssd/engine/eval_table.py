"""The per-class table of an evaluation (``ssd eval``, the end of ``ssd train``): each class's AP beside its
ground truth and its training boxes."""

from __future__ import annotations

import math

from ssd.metrics.coco import COCO_STATS


def format_table(result: dict, train_boxes: dict[str, int] | None = None) -> str:
    """Per-class table (class, #GT, AP, and with ``train_boxes`` the class's training boxes: a class that
    fails beside one that works often has a tenth of its boxes) and the mean; COCO's 12 numbers under it."""
    width = max([len("class")] + [len(n) for n in result["per_class"]])
    lines = [f"{'class':<{width}} {'#GT':>7} {'AP':>7} {'#train':>7}"]
    for name, ap in result["per_class"].items():
        n_train = "-" if train_boxes is None or name not in train_boxes else str(train_boxes[name])
        ap_text = "-" if math.isnan(ap) else f"{ap:.4f}"
        lines.append(f"{name:<{width}} {result['num_gt'][name]:>7d} {ap_text:>7} {n_train:>7}")
    counted = sum(not math.isnan(ap) for ap in result["per_class"].values())
    label = {"voc07": "mAP@0.5 (VOC07 11-point)", "voc": "mAP@0.5 (VOC area)", "coco": "AP@[.50:.95] (COCO)"}[
        result["metric"]
    ]
    lines.append(f"{label}: {result['map']:.4f} over {counted} class(es) with ground truth")
    if "map_50_95" in result and result["metric"] != "coco":
        lines.append(f"mAP@[.50:.95] (COCO's AP over IoU 0.50..0.95, same detections): {result['map_50_95']:.4f}")
    if result["metric"] == "coco" and all(k in result for k in COCO_STATS):  # the training report has no 12
        lines.append("  ".join(f"{k} {result[k]:.4f}" for k in COCO_STATS[:6]))
        lines.append("  ".join(f"{k} {result[k]:.4f}" for k in COCO_STATS[6:]))
    return "\n".join(lines)
