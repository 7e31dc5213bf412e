"""Inference over a dataset (sharded across ranks, gathered on rank 0) and its VOC mAP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ssd.config import PreprocessConfig
from ssd.data.dataset import DetectionDataset
from ssd.data.transforms import normalize_batch
from ssd.engine.distributed import gather_objects
from ssd.metrics.voc import voc_map
from ssd.postprocess import PostProcessor


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader,
    postprocessor: PostProcessor,
    preprocess: PreprocessConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """``{image_id: {"boxes" [N, 4] xyxy original-image pixels, "scores", "labels"}}`` of this rank's shard."""
    was_training = model.training
    model.eval()
    priors = model.priors if hasattr(model, "priors") else model.module.priors
    results = {}
    for batch in loader:
        if not batch["image_ids"]:
            continue
        images = normalize_batch(batch["images"].to(device, non_blocking=True), preprocess)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images)
        dets = postprocessor(out, priors, tuple(images.shape[-2:]), batch["orig_sizes"])
        for image_id, d in zip(batch["image_ids"], dets):
            results[image_id] = {k: v.cpu().numpy() for k, v in d.items()}
    model.train(was_training)
    return results


def gather_predictions(local: dict) -> dict | None:
    """Merge every rank's predictions on rank 0 (None on the other ranks)."""
    parts = gather_objects(local)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def voc_ground_truth(dataset: DetectionDataset, source_frame: bool) -> list[dict[str, np.ndarray]]:
    """Per-record ground truth (all objects, difficult flagged); in the annotation file's numbers
    when ``source_frame`` (VOC XML: 1-based inclusive) else continuous pixels."""
    out = []
    for rec in dataset.records:
        boxes = rec.source_boxes if source_frame and rec.source_boxes is not None else rec.boxes
        out.append({"boxes": np.asarray(boxes, np.float64), "labels": rec.labels, "difficult": rec.difficult})
    return out


def evaluate_voc(
    dataset: DetectionDataset, predictions: dict[str, dict], use_07_metric: bool = True, inclusive: bool = True
) -> dict:
    """VOC mAP of ``predictions`` (keyed by image id, pixels of the original image) on ``dataset``.

    For VOC-format data the detections are moved into the XML frame (``x1 + 1, y1 + 1, x2, y2``,
    the inverse of the loader's conversion; py-faster-rcnn writes its detections the same way).
    """
    voc_frame = bool(dataset.records) and dataset.records[0].coco_id is None
    shift = np.array([1.0, 1.0, 0.0, 0.0]) if voc_frame else np.zeros(4)
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    dets = []
    for rec in dataset.records:
        d = predictions.get(rec.image_id, empty)
        dets.append({"boxes": np.asarray(d["boxes"], np.float64) + shift, "scores": d["scores"], "labels": d["labels"]})
    result = voc_map(dets, voc_ground_truth(dataset, voc_frame), len(dataset.classes) + 1, use_07_metric, 0.5, inclusive)
    result["per_class"] = {dataset.classes[c - 1]: ap for c, ap in result["ap"].items()}
    result["metric"] = "voc07" if use_07_metric else "voc"
    return result
