"""An independent, straightforward VOC AP: py-faster-rcnn's ``voc_eval`` / ``voc_ap`` loop per
detection, transcribed with its variable names (minus the file reading), for the tests to compare
``ssd.metrics.voc`` against. ``one`` is the +1 of the inclusive pixel convention (0 for continuous).
Nothing here imports ssd."""

from __future__ import annotations

import numpy as np


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
    i = np.where(mrec[1:] != mrec[:-1])[0]
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
    class_recs = {}
    npos = 0
    for imagename, g in enumerate(ground_truth):
        mask = np.asarray(g["labels"]) == classname
        bbox = np.asarray(g["boxes"], float).reshape(-1, 4)[mask]
        difficult = np.asarray(g["difficult"], bool)[mask]
        det = [False] * len(bbox)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    image_ids, confidence, BB = [], [], []
    for imagename, d in enumerate(detections):  # the lines of the class's detection file, image by image
        for box, score, label in zip(
            np.asarray(d["boxes"], float).reshape(-1, 4), d["scores"], d["labels"], strict=True
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
