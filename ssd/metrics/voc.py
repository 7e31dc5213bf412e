"""PASCAL VOC average precision at IoU 0.5, the algorithm of the reference ``voc_eval``
(py-faster-rcnn, itself the devkit's), vectorised per class instead of looping per detection.

Reference semantics, kept exactly:
- a class's detections over all images are sorted by descending score (``np.argsort(-score)``
  on the detections concatenated in image order, the reference's call on the same array, so ties
  fall in the same order);
- each detection takes the ground truth of its image with the largest IoU (first in annotation
  order on ties, already-matched ones included); a match needs IoU **strictly greater** than the
  threshold;
- matched to a difficult ground truth: neither TP nor FP; to a ground truth already taken by an
  earlier detection: FP; otherwise the first detection to reach a ground truth is the TP;
- recall = cumsum(TP) / #non-difficult GT, precision = cumsum(TP) / max(cumsum(TP + FP), eps);
- VOC2007: mean over ``np.arange(0, 1.1, 0.1)`` of the max precision at recall >= t;
  VOC2010+: area under the monotone precision envelope with sentinels.
IoU uses +1 on widths and heights (``inclusive``: boxes are 1-based inclusive pixel indices, as in
the XML files; this reproduces the official numbers) or no +1 (``continuous``).
Classes without (non-difficult) ground truth get AP NaN and are left out of the mean.

Memory: the IoU of a detection chunk against its images' ground truth is ``[d, G]`` (G = the most
objects of the class in one image); chunks hold at most ``max_elements`` pairs, so a class with
millions of detections never builds a ``[D, G, 4]`` array at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ELEMENTS = 1 << 20  # detection x ground-truth pairs per IoU chunk (~60 MB of float64 temporaries)


@dataclass
class ClassDetections:
    image_index: np.ndarray  # [D] int, index into the image list
    scores: np.ndarray  # [D] float
    boxes: np.ndarray  # [D, 4] xyxy in the ground truth's frame


@dataclass
class ClassGroundTruth:
    image_index: np.ndarray  # [G] int, non-decreasing; within an image in annotation order
    boxes: np.ndarray  # [G, 4] xyxy
    difficult: np.ndarray  # [G] bool


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP from recall/precision arrays, exactly as the reference ``voc_ap``."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # 0.30000000000000004 etc., as the reference
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # == the reference's backward running max
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _pad_by_image(gt: ClassGroundTruth, num_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth -> ``row_of_image`` [num_images] (-1: no GT of the class), padded ``[R, G, 4]``
    boxes, ``[R, G]`` difficult and ``[R, G]`` valid, rows only for images that have GT."""
    img = gt.image_index.astype(np.int64)
    images, first, counts = np.unique(img, return_index=True, return_counts=True)
    row_of_image = np.full(num_images, -1, np.int64)
    row_of_image[images] = np.arange(len(images))
    g = int(counts.max()) if len(counts) else 1
    rows = row_of_image[img]
    slot = np.arange(len(img)) - np.repeat(first, counts)  # position within the image, annotation order
    boxes = np.zeros((len(images), g, 4))
    difficult = np.zeros((len(images), g), bool)
    valid = np.zeros((len(images), g), bool)
    boxes[rows, slot] = gt.boxes
    difficult[rows, slot] = gt.difficult
    valid[rows, slot] = True
    return row_of_image, boxes, difficult, valid


def _best_overlap(bb: np.ndarray, gt: np.ndarray, valid: np.ndarray, one: float) -> tuple[np.ndarray, np.ndarray]:
    """Per detection ``bb`` [d, 4] against its image's padded GT ``gt`` [d, G, 4]: the reference's
    ``jmax = argmax(overlaps)`` and ``ovmax`` (-inf where the image has no GT of the class)."""
    iw = np.maximum(np.minimum(gt[..., 2], bb[:, None, 2]) - np.maximum(gt[..., 0], bb[:, None, 0]) + one, 0.0)
    ih = np.maximum(np.minimum(gt[..., 3], bb[:, None, 3]) - np.maximum(gt[..., 1], bb[:, None, 1]) + one, 0.0)
    inters = iw * ih
    area_det = (bb[:, 2] - bb[:, 0] + one) * (bb[:, 3] - bb[:, 1] + one)
    area_gt = (gt[..., 2] - gt[..., 0] + one) * (gt[..., 3] - gt[..., 1] + one)
    with np.errstate(divide="ignore", invalid="ignore"):
        overlaps = np.where(valid, inters / (area_det[:, None] + area_gt - inters), -np.inf)  # [d, G]
    jmax = overlaps.argmax(axis=1)
    return jmax, overlaps[np.arange(len(bb)), jmax]


def class_tp_fp(
    dets: ClassDetections,
    gt: ClassGroundTruth,
    num_images: int,
    iou_threshold: float = 0.5,
    inclusive: bool = True,
    max_elements: int = MAX_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP flags (float64 [D]) of one class's detections in descending-score order."""
    order = np.argsort(-dets.scores)  # the reference's call, for identical tie order
    num = len(order)
    img = dets.image_index[order].astype(np.int64)
    bb = np.asarray(dets.boxes, np.float64)[order]
    row_of_image, boxes, difficult, valid = _pad_by_image(gt, num_images)
    rows = row_of_image[img]  # [D], -1: the image has no GT of the class (always FP)
    has_gt = np.flatnonzero(rows >= 0)
    jmax = np.zeros(num, np.int64)
    ovmax = np.full(num, -np.inf)
    step = max(1, max_elements // boxes.shape[1])
    one = 1.0 if inclusive else 0.0
    for start in range(0, len(has_gt), step):
        idx = has_gt[start : start + step]
        r = rows[idx]
        jmax[idx], ovmax[idx] = _best_overlap(bb[idx], boxes[r], valid[r], one)
    hit = ovmax > iou_threshold  # strictly greater, as the reference
    hit_difficult = np.zeros(num, bool)
    hit_difficult[hit] = difficult[rows[hit], jmax[hit]]
    candidate = hit & ~hit_difficult
    # the first detection (in score order) to reach a ground truth is its TP, later ones are FP
    gt_key = rows * boxes.shape[1] + jmax
    cand_idx = np.flatnonzero(candidate)
    _, first = np.unique(gt_key[cand_idx], return_index=True)  # first occurrences (stable sort)
    tp = np.zeros(num)
    tp[cand_idx[first]] = 1.0
    fp = (~hit).astype(np.float64)
    fp[cand_idx] = 1.0
    fp[cand_idx[first]] = 0.0
    return tp, fp


def voc_class_ap(
    dets: ClassDetections,
    gt: ClassGroundTruth,
    num_images: int,
    use_07_metric: bool,
    iou_threshold: float = 0.5,
    inclusive: bool = True,
    max_elements: int = MAX_ELEMENTS,
) -> tuple[float, np.ndarray, np.ndarray]:
    """AP, recall and precision of one class (NaN AP and empty curves without non-difficult GT)."""
    npos = int((~gt.difficult).sum())
    if npos == 0:
        return float("nan"), np.zeros(0), np.zeros(0)
    tp, fp = class_tp_fp(dets, gt, num_images, iou_threshold, inclusive, max_elements)
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric), rec, prec


def _concat(arrays: list, dtype, shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype).reshape(shape) for a in arrays] + [np.zeros((0,) + shape[1:], dtype)])


def voc_map(
    detections: list[dict[str, np.ndarray]],
    ground_truth: list[dict[str, np.ndarray]],
    num_classes: int,
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
    inclusive: bool = True,
    max_elements: int = MAX_ELEMENTS,
) -> dict:
    """mAP over classes 1..num_classes-1.

    ``detections[i]`` / ``ground_truth[i]`` belong to image i: detections ``{"boxes" [N, 4],
    "scores" [N], "labels" [N]}``; ground truth ``{"boxes", "labels", "difficult"}``, xyxy boxes in
    the same frame (the annotation file's numbers for the official VOC figures).
    Returns ``{"map", "ap": {label: AP}, "curves": {label: (rec, prec)}, "npos": {label: n}}``;
    ``npos`` counts non-difficult ground truth, AP is NaN where it is 0.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    num_images = len(ground_truth)
    det_img = np.repeat(np.arange(num_images), [len(d["scores"]) for d in detections])
    det_lab = _concat([d["labels"] for d in detections], np.int64, (-1,))
    det_scr = _concat([d["scores"] for d in detections], np.float64, (-1,))
    det_box = _concat([d["boxes"] for d in detections], np.float64, (-1, 4))
    gt_img = np.repeat(np.arange(num_images), [len(g["labels"]) for g in ground_truth])
    gt_lab = _concat([g["labels"] for g in ground_truth], np.int64, (-1,))
    gt_box = _concat([g["boxes"] for g in ground_truth], np.float64, (-1, 4))
    gt_diff = _concat([g["difficult"] for g in ground_truth], bool, (-1,))
    if not (len(det_img) == len(det_lab) == len(det_box)) or not (
        len(gt_img) == len(gt_lab) == len(gt_box) == len(gt_diff)
    ):
        raise ValueError(
            "every image needs as many boxes as labels and scores (detections) or difficult flags (ground truth)"
        )
    # group by class once; a stable sort keeps each class's detections in image order, the order
    # the reference concatenates them in (its argsort then breaks score ties the same way)
    det_order, gt_order = np.argsort(det_lab, kind="stable"), np.argsort(gt_lab, kind="stable")
    det_start = np.searchsorted(det_lab[det_order], np.arange(num_classes + 1))
    gt_start = np.searchsorted(gt_lab[gt_order], np.arange(num_classes + 1))
    ap, curves, npos = {}, {}, {}
    for c in range(1, num_classes):
        sel, gsel = det_order[det_start[c] : det_start[c + 1]], gt_order[gt_start[c] : gt_start[c + 1]]
        dets = ClassDetections(det_img[sel], det_scr[sel], det_box[sel])
        gt = ClassGroundTruth(gt_img[gsel], gt_box[gsel], gt_diff[gsel])
        ap[c], rec, prec = voc_class_ap(dets, gt, num_images, use_07_metric, iou_threshold, inclusive, max_elements)
        curves[c] = (rec, prec)
        npos[c] = int((~gt.difficult).sum())
    valid = [v for v in ap.values() if not np.isnan(v)]
    return {"map": float(np.mean(valid)) if valid else float("nan"), "ap": ap, "curves": curves, "npos": npos}
