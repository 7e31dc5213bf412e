"""The ``voc_eval`` bench row: VOC07 mAP over a VOC07-test-sized case vs the py-faster-rcnn reference loop."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ssd.bench.timing import timeit
from ssd.metrics.voc import voc_map

# VOC07 test: non-difficult objects per class (devkit statistics, 12032 in all): realistic class frequencies
VOC07_TEST_OBJECTS = [
    285,
    337,
    459,
    263,
    469,
    213,
    1201,
    358,
    756,
    244,
    206,
    489,
    348,
    325,
    4528,
    480,
    242,
    239,
    282,
    308,
]


def voc07_test_case(num_images: int = 4952, dets_per_image: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A VOC07-test-sized evaluation, in the XML frame: ``(detections, ground_truth)`` per image.

    Ground truth: 1 + Poisson(2) objects per image (VOC07 test has ~3.0), a fifth difficult, classes
    at VOC07 test's frequencies, integer 1-based boxes of 20..450 px in 500 x 300..500 images.
    Detections: ``dets_per_image`` (the post-processing's 200), as a trained detector's look after
    NMS: 1-3 per object jittered by ~10% of its size (a tenth mislabelled), the first with a high
    score (Beta(4, 1.5)), duplicates lower (Beta(1.5, 4)); the rest background boxes with scores
    0.01 + Exp(0.04), the long low tail of softmax scores above the 0.01 threshold; float32 scores.
    """
    rng = np.random.default_rng(seed)
    class_p = np.asarray(VOC07_TEST_OBJECTS, float) / sum(VOC07_TEST_OBJECTS)
    detections, ground_truth = [], []
    for _ in range(num_images):
        width, height = 500, int(rng.integers(300, 501))
        n = 1 + int(rng.poisson(2.0))
        side = np.exp(rng.uniform(np.log(20), np.log(450), (n, 2))).clip(max=[width - 1, height - 1])
        xy = rng.uniform(1, [width, height] - side)
        gt_boxes = np.round(np.concatenate([xy, xy + side], 1))
        gt_labels = rng.choice(20, n, p=class_p) + 1
        ground_truth.append({"boxes": gt_boxes, "labels": gt_labels, "difficult": rng.random(n) < 0.2})
        copies = np.minimum(1 + rng.poisson(1.0, n), 3)
        src = np.repeat(np.arange(n), copies)
        first = np.r_[True, src[1:] != src[:-1]]
        wh = (gt_boxes[src, 2:] - gt_boxes[src, :2])[:, [0, 1, 0, 1]]
        near = gt_boxes[src] + rng.normal(0, 0.1, (len(src), 4)) * wh
        near_labels = np.where(rng.random(len(src)) < 0.9, gt_labels[src], rng.choice(20, len(src), p=class_p) + 1)
        near_scores = np.where(first, rng.beta(4, 1.5, len(src)), rng.beta(1.5, 4, len(src)))
        m = max(0, dets_per_image - len(src))
        bg_side = np.exp(rng.uniform(np.log(10), np.log(400), (m, 2))).clip(max=[width - 1, height - 1])
        bg_xy = rng.uniform(1, [width, height] - bg_side)
        boxes = np.concatenate([near, np.concatenate([bg_xy, bg_xy + bg_side], 1)])[:dets_per_image]
        labels = np.concatenate([near_labels, rng.choice(20, m, p=class_p) + 1])[:dets_per_image]
        scores = np.concatenate([near_scores, np.minimum(0.01 + rng.exponential(0.04, m), 0.99)])[:dets_per_image]
        order = np.argsort(-scores, kind="stable")  # the post-processing returns them by score
        detections.append(
            {
                "boxes": boxes[order],
                "scores": scores[order].astype(np.float32).astype(np.float64),
                "labels": labels[order],
            }
        )
    return detections, ground_truth


# py-faster-rcnn's ``voc_eval`` / ``voc_ap``, the loop per detection transcribed with its variable names (minus
# reading the files): the peer of the row, and the independent reference tests compare ssd.metrics.voc with.
# ``one`` is the +1 of the inclusive pixel convention (0 for continuous).


def reference_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]  # type: ignore[assignment]  # the original reuses i
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def reference_voc_eval(
    detections: list[dict],
    ground_truth: list[dict],
    classname: int,
    ovthresh: float = 0.5,
    use_07_metric: bool = True,
    one: float = 1.0,
) -> float:
    """AP of class ``classname`` (NaN without non-difficult ground truth, where the original divides by 0)."""
    class_recs: dict[int, dict[str, Any]] = {}
    npos = 0
    for imagename, g in enumerate(ground_truth):
        mask = np.asarray(g["labels"]) == classname
        bbox = np.asarray(g["boxes"], float).reshape(-1, 4)[mask]
        difficult = np.asarray(g["difficult"], bool)[mask]
        det = [False] * len(bbox)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    image_ids: list[int] = []
    confidence: Any = []  # a list, then the array of it, as in the original
    BB: Any = []
    for imagename, dets in enumerate(detections):  # the lines of the class's detection file, image by image
        for box, score, label in zip(
            np.asarray(dets["boxes"], float).reshape(-1, 4), dets["scores"], dets["labels"], strict=True
        ):
            if label == classname:
                image_ids.append(imagename)
                confidence.append(float(score))
                BB.append(box)
    confidence = np.array(confidence)
    BB = np.array(BB).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + one, 0.0)
            ih = np.maximum(iymax - iymin + one, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
                + (BBGT[:, 2] - BBGT[:, 0] + one) * (BBGT[:, 3] - BBGT[:, 1] + one)
                - inters
            )
            with np.errstate(invalid="ignore"):  # 0 / 0 for empty boxes without the +1: NaN, never a match
                overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    if npos == 0:
        return float("nan")
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return float(reference_voc_ap(rec, prec, use_07_metric))


def bench_voc_eval(repeats: int) -> dict:
    """VOC07 mAP over a VOC07-test-sized case (4952 images, 20 classes, 200 detections per image)
    vs py-faster-rcnn's loop per detection; identical APs required. The peer runs once (~tens of s)."""
    detections, ground_truth = voc07_test_case()
    t = time.perf_counter()
    peer_ap = {c: reference_voc_eval(detections, ground_truth, c) for c in range(1, 21)}
    peer_s = time.perf_counter() - t
    ours = voc_map(detections, ground_truth, 21, use_07_metric=True)
    assert ours["ap"] == peer_ap, f"VOC APs differ from the reference loop: {ours['ap']} vs {peer_ap}"
    ours_s = timeit(lambda: voc_map(detections, ground_truth, 21, use_07_metric=True), max(1, repeats // 2))
    return {
        "name": "voc_eval",
        "ours_s": ours_s,
        "peer": "py-faster-rcnn voc_eval (loop per detection)",
        "peer_s": peer_s,
        "target": 10.0,
    }
