"""PASCAL VOC average precision at IoU 0.5, the algorithm of the reference ``voc_eval``
(py-faster-rcnn, itself the devkit's), vectorised per class instead of looping per detection.

Reference semantics, kept exactly:
- a class's detections over all images are sorted by descending score (``np.argsort(-score)``);
- each detection takes the ground truth of its image with the largest IoU (first on ties,
  already-matched ones included); a match needs IoU **strictly greater** than the threshold;
- matched to a difficult ground truth: neither TP nor FP; to a ground truth already taken by an
  earlier detection: FP; otherwise the first detection to reach a ground truth is the TP;
- recall = cumsum(TP) / #non-difficult GT, precision = cumsum(TP) / max(cumsum(TP + FP), eps);
- VOC2007: mean over ``np.arange(0, 1.1, 0.1)`` of the max precision at recall >= t;
  VOC2010+: area under the monotone precision envelope with sentinels.
IoU uses +1 on widths and heights (``inclusive``: boxes are 1-based inclusive pixel indices, as in
the XML files; this reproduces the official numbers) or no +1 (``continuous``).
Classes without ground truth get AP NaN and are left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassDetections:
    image_index: np.ndarray  # [D] int, index into the ground-truth list
    scores: np.ndarray  # [D] float
    boxes: np.ndarray  # [D, 4] xyxy in the ground truth's frame


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP from recall/precision arrays, exactly as the reference ``voc_ap``."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # == the reference's backward running max
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _pad_gt(gt_boxes: list[np.ndarray], gt_difficult: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image GT of one class -> padded [I, G, 4] boxes, [I, G] difficult, [I, G] valid."""
    g = max([1] + [len(b) for b in gt_boxes])
    boxes = np.zeros((len(gt_boxes), g, 4))
    difficult = np.zeros((len(gt_boxes), g), bool)
    valid = np.zeros((len(gt_boxes), g), bool)
    for i, (b, d) in enumerate(zip(gt_boxes, gt_difficult)):
        boxes[i, : len(b)] = b
        difficult[i, : len(b)] = d
        valid[i, : len(b)] = True
    return boxes, difficult, valid


def class_tp_fp(
    dets: ClassDetections, gt_boxes: list[np.ndarray], gt_difficult: list[np.ndarray], iou_threshold: float = 0.5,
    inclusive: bool = True,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """TP / FP flags of one class's detections in descending-score order."""
    order = np.argsort(-dets.scores)  # the reference's call, for identical tie order
    img = dets.image_index[order]
    bb = dets.boxes[order].astype(np.float64)
    boxes, difficult, valid = _pad_gt(gt_boxes, gt_difficult)
    gt = boxes[img]  # [D, G, 4]
    one = 1.0 if inclusive else 0.0
    iw = np.maximum(np.minimum(gt[..., 2], bb[:, None, 2]) - np.maximum(gt[..., 0], bb[:, None, 0]) + one, 0.0)
    ih = np.maximum(np.minimum(gt[..., 3], bb[:, None, 3]) - np.maximum(gt[..., 1], bb[:, None, 1]) + one, 0.0)
    inters = iw * ih
    uni = ((bb[:, 2] - bb[:, 0] + one) * (bb[:, 3] - bb[:, 1] + one))[:, None] + (gt[..., 2] - gt[..., 0] + one) * (
        gt[..., 3] - gt[..., 1] + one
    ) - inters
    with np.errstate(divide="ignore", invalid="ignore"):
        overlaps = np.where(valid[img], inters / uni, -np.inf)  # [D, G]
    jmax = overlaps.argmax(axis=1) if len(order) else np.zeros(0, int)
    ovmax = overlaps[np.arange(len(order)), jmax] if len(order) else np.zeros(0)
    hit = ovmax > iou_threshold
    hit_difficult = hit & difficult[img, jmax]
    candidate = hit & ~hit_difficult
    # the first detection (in score order) that reaches a ground truth is its TP, later ones are FP
    gt_key = img.astype(np.int64) * boxes.shape[1] + jmax
    tp = np.zeros(len(order))
    cand_idx = np.flatnonzero(candidate)
    _, first = np.unique(gt_key[cand_idx], return_index=True)
    tp[cand_idx[first]] = 1.0
    fp = (~hit).astype(np.float64)
    fp[cand_idx] = 1.0
    fp[cand_idx[first]] = 0.0
    return tp, fp


def voc_class_ap(
    dets: ClassDetections, gt_boxes: list[np.ndarray], gt_difficult: list[np.ndarray], use_07_metric: bool,
    iou_threshold: float = 0.5, inclusive: bool = True,
) -> tuple[float, np.ndarray, np.ndarray]:  # fmt: skip
    """AP, recall and precision of one class (NaN AP when the class has no non-difficult GT)."""
    npos = int(sum(int((~d).sum()) for d in gt_difficult))
    tp, fp = class_tp_fp(dets, gt_boxes, gt_difficult, iou_threshold, inclusive)
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    if npos == 0:
        return float("nan"), np.zeros(0), np.zeros(0)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric), rec, prec


def voc_map(
    detections: list[dict[str, np.ndarray]],
    ground_truth: list[dict[str, np.ndarray]],
    num_classes: int,
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
    inclusive: bool = True,
) -> dict:
    """mAP over classes 1..num_classes-1.

    ``detections[i]`` / ``ground_truth[i]`` belong to image i: detections ``{"boxes" [N, 4],
    "scores" [N], "labels" [N]}``; ground truth ``{"boxes", "labels", "difficult"}``, boxes in
    the same frame (the annotation file's numbers for the official VOC figures).
    Returns ``{"map", "ap": {label: AP}, "curves": {label: (rec, prec)}, "npos": {label: n}}``.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    ap, curves, npos = {}, {}, {}
    det_img = np.concatenate([np.full(len(d["scores"]), i) for i, d in enumerate(detections)] + [np.zeros(0, int)])
    det_lab = np.concatenate([np.asarray(d["labels"]) for d in detections] + [np.zeros(0, int)])
    det_scr = np.concatenate([np.asarray(d["scores"], np.float64) for d in detections] + [np.zeros(0)])
    det_box = np.concatenate([np.asarray(d["boxes"], np.float64).reshape(-1, 4) for d in detections] + [np.zeros((0, 4))])
    for c in range(1, num_classes):
        gt_boxes = [np.asarray(g["boxes"], np.float64).reshape(-1, 4)[np.asarray(g["labels"]) == c] for g in ground_truth]
        gt_diff = [np.asarray(g["difficult"], bool)[np.asarray(g["labels"]) == c] for g in ground_truth]
        sel = det_lab == c
        dets = ClassDetections(det_img[sel].astype(np.int64), det_scr[sel], det_box[sel])
        ap[c], rec, prec = voc_class_ap(dets, gt_boxes, gt_diff, use_07_metric, iou_threshold, inclusive)
        curves[c] = (rec, prec)
        npos[c] = int(sum(int((~d).sum()) for d in gt_diff))
    valid = [v for v in ap.values() if not np.isnan(v)]
    return {"map": float(np.mean(valid)) if valid else float("nan"), "ap": ap, "curves": curves, "npos": npos}
