"""COCO box metrics through pycocotools ``COCOeval``: the 12 standard numbers and per-class AP.

Results are COCO results dicts (``image_id``, ``category_id``, ``bbox`` xywh pixels, ``score``)
in the ground truth's own image and category ids. pycocotools prints its progress; here that
text goes to the ``ssd.metrics.coco`` logger at debug level.

Per-class AP is the mean of ``eval["precision"][:, :, k, area all, maxDets 100]`` over the IoU
thresholds .50:.95 and 101 recall points, the quantity whose mean over classes is ``AP``.
A class without ground truth in the evaluated images has precision -1 there: AP NaN, and
pycocotools leaves it out of ``AP`` as well. (``faster-coco-eval`` is not used: pycocotools is the
reference, and the other was not shown here to give the same 12 numbers.)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import numpy as np

log = logging.getLogger(__name__)

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def quiet_pycocotools():
    """Route what pycocotools prints to the debug log."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("pycocotools: %s", line)


def coco_from_dict(dataset: dict):
    """A pycocotools ``COCO`` built from an in-memory instances dict (``images``, ``categories``, ``annotations``)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with quiet_pycocotools():
        coco.createIndex()
    return coco


def load_results(coco_gt, results: list[dict]):
    """``coco_gt.loadRes`` on copies of ``results`` (it writes ``area``/``id``/``segmentation`` into
    each dict); an empty list gives an empty results object, which ``loadRes`` cannot make."""
    if not results:
        return coco_from_dict(
            {
                "images": list(coco_gt.dataset["images"]),
                "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                "annotations": [],
            }
        )
    with quiet_pycocotools():
        return coco_gt.loadRes([dict(r) for r in results])


def coco_eval(
    coco_gt, results: list[dict], image_ids: list[int] | None = None, cat_ids: list[int] | None = None
) -> dict:
    """Evaluate ``results`` against ``coco_gt`` on ``image_ids`` (default: every image of ``coco_gt``)
    and the categories ``cat_ids`` (default: all; a subset leaves the others out of every number).

    Returns ``{"stats": {name: value} (COCO_STATS order), "per_class": {category id: AP .50:.95},
    "curves": {category id: (recall [R], precision [T, R])} (NaN where undefined), "iou_thresholds":
    [T], "num_gt": {category id: non-crowd objects}}``. With no detections at all every AP and AR
    is 0 (pycocotools cannot load an empty results list; its evaluation of an empty set gives 0).
    """
    from pycocotools.cocoeval import COCOeval

    coco_dt = load_results(coco_gt, results)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    if cat_ids is not None:
        evaluator.params.catIds = sorted(cat_ids)
    with quiet_pycocotools():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    params = evaluator.params
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    area_all, max_dets = params.areaRngLbl.index("all"), len(params.maxDets) - 1  # maxDets 100
    per_class, curves = {}, {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area_all, max_dets]  # [T, R]
        per_class[cat_id] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        curves[cat_id] = (np.asarray(params.recThrs), np.where(p > -1, p, np.nan))
    images = set(params.imgIds)
    num_gt = {cat_id: 0 for cat_id in params.catIds}
    for ann in coco_gt.dataset.get("annotations", []):
        if ann["image_id"] in images and not ann.get("iscrowd", 0) and ann["category_id"] in num_gt:
            num_gt[ann["category_id"]] += 1
    return {
        "stats": dict(zip(COCO_STATS, (float(s) for s in evaluator.stats), strict=True)),
        "per_class": per_class,
        "curves": curves,
        "iou_thresholds": np.asarray(params.iouThrs),
        "num_gt": num_gt,
    }
