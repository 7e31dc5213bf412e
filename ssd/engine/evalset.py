"""The evaluation set in its annotation file's frame: ground truth, detections, metrics, result files.

The annotation file's frame, the one detection files use (``detections.json``, ``--detections``):
- VOC-format data: boxes in the XML's 1-based inclusive numbers. A prediction ``(x1, y1, x2, y2)``
  in continuous pixels is ``xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2`` (the inverse of the
  loader's conversion; py-faster-rcnn writes its detections the same way); its COCO-results
  ``bbox`` is ``[xmin, ymin, xmax - xmin, ymax - ymin]``, ``image_id`` the split file's id string
  and ``category_id`` the 1-based index in ``classes``.
- YOLO-format data: as VOC-format data, the pixel boxes written in VOC's numbers (``xmin = x1 + 1``),
  image ids the image paths relative to the root without extension (see :mod:`ssd.data.yolo`).
- COCO-format data: the file's own ``[x, y, w, h]``, image ids and category ids; only the categories
  of ``classes`` are scored (matched by name; a subset with ``ignore_other_classes``).
Labels are the data's (1-based index in ``dataset.classes``); a model with other classes (a converted
torchvision COCO model's 90 names with ``N/A`` gaps on a file with 80 or fewer categories) is
matched by name first: :func:`class_label_map`, :func:`relabel_predictions`.
Every metric and every written file derives from the same float64 ``[x, y, w, h]`` arrays, so a
written ``detections.json`` read back with ``--detections`` gives bit-identical metrics.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, overload

import numpy as np

from ssd.classes import class_key, match_classes
from ssd.data.coco import label_to_category_id, load_coco
from ssd.data.dataset import DetectionDataset
from ssd.metrics.coco import coco_eval, coco_from_dict
from ssd.metrics.voc import voc_map

log = logging.getLogger("ssd.eval")

METRICS = ("voc07", "voc", "coco")
PIXEL_CONVENTIONS = ("inclusive", "continuous")
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def resolve_metric(metric: str | None, coco_format: bool) -> str:
    """``auto`` / None -> ``coco`` for COCO-format data, ``voc07`` for VOC-format data."""
    if metric in (None, "auto"):
        return "coco" if coco_format else "voc07"
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of auto, {', '.join(METRICS)}")
    return metric


def _number(v) -> bool:
    return type(v) in (int, float)  # JSON numbers; bool is not one


def _xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    """``[x, y, w, h]`` of a detection file -> ``[x, y, x + w, y + h]``, the one place this sum is made."""
    return np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], 1)


class EvalSet:
    """The ground truth of ``dataset`` with the ids and box frame of its annotation file.

    Detections here are lists aligned with ``dataset.records``: ``{"boxes": float64 [N, 4] xywh in
    the file's frame, "scores": float64 [N], "labels": int64 [N] (1-based)}``.
    ``annotations`` is the COCO instances file of COCO-format data (``data.val.annotations``).
    """

    def __init__(self, dataset: DetectionDataset, annotations: str | os.PathLike | None = None) -> None:
        self.dataset = dataset
        self.classes = list(dataset.classes)
        records = dataset.records
        self.coco_format = bool(records) and records[0].coco_id is not None
        seen: dict[str, str] = {}
        for rec in records:
            if rec.image_id in seen:
                raise ValueError(
                    f"image id {rec.image_id!r} appears twice in the evaluation set ({seen[rec.image_id]} and "
                    f"{rec.path}); detections are matched to images by id, so ids must be unique"
                )
            seen[rec.image_id] = rec.path
        if self.coco_format:
            if annotations is None:
                raise ValueError("evaluating COCO-format data needs its annotation file (data.val.annotations)")
            self.coco_gt = load_coco(annotations)
            self.result_image_ids: list[Any] = [rec.coco_id for rec in records]  # COCO: ints; VOC: strings
            self.category_of_label = label_to_category_id(self.coco_gt, self.classes)
            if not self.category_of_label:
                raise ValueError(f"{annotations}: none of the classes {self.classes[:5]} is a category of the file")
        else:
            self.coco_gt = None  # built on first use: COCO metrics on VOC-format data
            self.result_image_ids = [rec.image_id for rec in records]
            self.category_of_label = {i + 1: i + 1 for i in range(len(self.classes))}
        self.record_of_image_id = {image_id: i for i, image_id in enumerate(self.result_image_ids)}
        self.label_of_category = {cat: label for label, cat in self.category_of_label.items()}

    # frames -------------------------------------------------------------------------------------

    def from_predictions(
        self, predictions: dict[str, dict], model_classes: list[str] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Predictions (continuous original-image pixels, keyed by image id) -> the file's frame.
        ``model_classes``: the classes the predictions' labels index, when not the data's
        (see :func:`class_label_map`)."""
        if model_classes is not None:
            predictions = relabel_predictions(predictions, class_label_map(model_classes, self.classes, "model"))
        shift = np.zeros(2) if self.coco_format else np.ones(2)  # VOC: xmin = x1 + 1, xmax = x2
        out = []
        for rec in self.dataset.records:
            d = predictions.get(rec.image_id)
            if d is None:
                out.append(self._empty())
                continue
            xyxy = np.asarray(d["boxes"], np.float64).reshape(-1, 4)
            xy = xyxy[:, :2] + shift
            boxes = np.concatenate([xy, xyxy[:, 2:] - xy], 1)
            out.append(
                {
                    "boxes": boxes,
                    "scores": np.asarray(d["scores"], np.float64).reshape(-1),
                    "labels": np.asarray(d["labels"], np.int64).reshape(-1),
                }
            )
        return out

    @staticmethod
    def _empty() -> dict[str, np.ndarray]:
        return {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}

    def ground_truth(self) -> list[dict[str, np.ndarray]]:
        """Per record: xyxy boxes as written in the annotation file (all objects, difficult flagged)."""
        return [
            {
                "boxes": np.asarray(rec.boxes if rec.source_boxes is None else rec.source_boxes, np.float64).reshape(
                    -1, 4
                ),
                "labels": rec.labels,
                "difficult": rec.difficult,
            }
            for rec in self.dataset.records
        ]

    # metrics ------------------------------------------------------------------------------------

    def evaluate(
        self, detections: list[dict], metric: str | None = "auto", voc_pixel_convention: str = "inclusive"
    ) -> dict:
        """``{"metric", "map", "per_class": {name: AP}, "num_gt": {name: n}, "curves": {name: [(label,
        recall, precision), ...]}}`` plus, for COCO, the 12 numbers of ``COCO_STATS`` by name."""
        metric = resolve_metric(metric, self.coco_format)
        if voc_pixel_convention not in PIXEL_CONVENTIONS:
            raise ValueError(
                f"voc_pixel_convention {voc_pixel_convention!r} is not one of {', '.join(PIXEL_CONVENTIONS)}"
            )
        if len(detections) != len(self.dataset.records):
            raise ValueError(f"{len(detections)} detection lists for {len(self.dataset.records)} images")
        if metric == "coco":
            return self._evaluate_coco(detections)
        dets = [{"boxes": _xyxy(d["boxes"]), "scores": d["scores"], "labels": d["labels"]} for d in detections]
        res = voc_map(
            dets,
            self.ground_truth(),
            len(self.classes) + 1,
            metric == "voc07",
            0.5,
            voc_pixel_convention == "inclusive",
        )
        return {
            "metric": metric,
            "map": res["map"],
            "per_class": {self.classes[c - 1]: ap for c, ap in res["ap"].items()},
            "num_gt": {self.classes[c - 1]: n for c, n in res["npos"].items()},
            "curves": {self.classes[c - 1]: [("IoU > 0.5", *res["curves"][c])] for c in res["ap"]},
            "ap": res["ap"],
        }

    def _evaluate_coco(self, detections: list[dict]) -> dict:
        if self.coco_gt is None:
            self.coco_gt = self._coco_from_records()
        # only the categories of the listed classes are scored (a `classes` subset with ignore_other_classes)
        res = coco_eval(
            self.coco_gt,
            self.results(detections),
            list(self.record_of_image_id) if self.coco_format else list(range(1, len(self.dataset.records) + 1)),
            sorted(self.label_of_category),
        )
        out = {"metric": "coco", "map": res["stats"]["AP"], "per_class": {}, "num_gt": {}, "curves": {}}
        thresholds = [round(float(t), 2) for t in res["iou_thresholds"]]
        for label, name in enumerate(self.classes, 1):
            cat = self.category_of_label.get(label)
            out["per_class"][name] = res["per_class"].get(cat, float("nan"))
            out["num_gt"][name] = res["num_gt"].get(cat, 0)
            if cat in res["curves"]:
                recall, precision = res["curves"][cat]
                mean = np.nanmean(precision, 0) if not np.isnan(precision).all() else precision[0]
                out["curves"][name] = [
                    (f"IoU {thresholds[0]:.2f}", recall, precision[0]),
                    (f"IoU {thresholds[5]:.2f}", recall, precision[5]),
                    ("IoU .50:.95 mean", recall, mean),
                ]
        out.update(res["stats"])
        return out

    def _coco_from_records(self):
        """COCO ground truth of VOC-format data, in the XML's numbers: ``bbox = [xmin, ymin, xmax -
        xmin, ymax - ymin]`` (the detection files' convention), difficult objects as crowd
        (ignored), image ids 1..N in record order, category ids = labels."""
        images, annotations = [], []
        for i, (rec, gt) in enumerate(zip(self.dataset.records, self.ground_truth(), strict=True), 1):
            images.append({"id": i, "width": rec.width, "height": rec.height, "file_name": rec.path})
            for box, label, difficult in zip(
                gt["boxes"].tolist(), gt["labels"].tolist(), gt["difficult"].tolist(), strict=True
            ):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i,
                        "category_id": label,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": int(difficult),
                    }
                )
        categories = [{"id": label, "name": name} for label, name in enumerate(self.classes, 1)]
        return coco_from_dict({"images": images, "annotations": annotations, "categories": categories})

    # COCO results format ---------------------------------------------------------------------------

    def results(self, detections: list[dict], file_ids: bool = False) -> list[dict]:
        """COCO results dicts in record order. ``file_ids``: VOC image ids as the split file's strings
        (what ``detections.json`` holds); else 1..N, the ids of the in-memory COCO ground truth."""
        out, dropped = [], 0
        for i, (image_id, d) in enumerate(zip(self.result_image_ids, detections, strict=True)):
            if not self.coco_format and not file_ids:
                image_id = i + 1
            for box, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True):
                cat = self.category_of_label.get(label)
                if cat is None:
                    dropped += 1
                    continue
                out.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
        if dropped:
            log.warning(
                "%d detection(s) have a label without a category in the annotation file and were left out", dropped
            )
        return out

    def read_results(self, path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
        """A COCO results file (a JSON list) -> detections per record, file order kept within an image.

        Errors (``ValueError``) name the file and the first offending entry's index.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: detections file not found")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a JSON list of detections in COCO results format "
                f'([{{"image_id", "category_id", "bbox": [x, y, w, h], "score"}}, ...]), got a {type(data).__name__}'
            )
        if self.coco_format:
            id_hint = "COCO-format data.val: use the annotation file's integer image ids"
            cat_hint = f"valid: the annotation file's category ids {sorted(self.label_of_category)[:10]}"
        else:
            id_hint = (
                f"VOC-format data.val: use the split file's id strings, e.g. {self.result_image_ids[0]!r}"
                if self.result_image_ids
                else ""
            )
            cat_hint = f"valid: 1..{len(self.classes)}, the 1-based index in classes"
        min_size = 0.0 if self.coco_format else -1.0  # VOC: inclusive numbers, xmax = xmin - 1 is an empty box
        rows, labels, boxes, scores = [], [], [], []
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object with {', '.join(RESULT_KEYS)}, got {entry!r:.80}")
            missing = [k for k in RESULT_KEYS if k not in entry]
            if missing:
                raise ValueError(
                    f"{where}: missing key(s) {', '.join(missing)} (each detection needs {', '.join(RESULT_KEYS)})"
                )
            image_id, cat, bbox, score = (entry[k] for k in RESULT_KEYS)
            row = (
                self.record_of_image_id.get(image_id)
                if isinstance(image_id, (str, int)) and type(image_id) is not bool
                else None
            )
            if row is None:
                raise ValueError(f"{where}: unknown image_id {image_id!r}, not in data.val ({id_hint})")
            label = self.label_of_category.get(cat) if type(cat) is int else None
            if label is None:
                raise ValueError(f"{where}: unknown category_id {cat!r} ({cat_hint})")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
                raise ValueError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {bbox!r:.80}")
            if not all(math.isfinite(v) for v in bbox):
                raise ValueError(f"{where}: bbox {bbox} has a non-finite value")
            if bbox[2] < min_size or bbox[3] < min_size:
                extra = "" if self.coco_format else " (VOC numbers are inclusive: width = xmax - xmin >= -1)"
                raise ValueError(f"{where}: bbox {bbox} has a negative size{extra}")
            if not _number(score) or not math.isfinite(score):
                raise ValueError(f"{where}: score must be a finite number, got {score!r}")
            rows.append(row)
            labels.append(label)
            boxes.append(bbox)
            scores.append(score)
        row_array = np.asarray(rows, np.int64)
        order = np.argsort(row_array, kind="stable")  # grouped by image, file order within each
        starts = np.searchsorted(row_array[order], np.arange(len(self.dataset.records) + 1))
        box_array, score_array, label_array = (
            np.asarray(boxes, np.float64).reshape(-1, 4)[order],
            np.asarray(scores, np.float64)[order],
            np.asarray(labels, np.int64)[order],
        )
        return [
            {"boxes": box_array[a:b], "scores": score_array[a:b], "labels": label_array[a:b]}
            for a, b in itertools.pairwise(starts)
        ]

    def write_results(self, path: str | os.PathLike, detections: list[dict]) -> int:
        """Write ``detections.json`` (COCO results format, the file's ids and frame); returns the count."""
        results = self.results(detections, file_ids=True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, separators=(",", ":"))  # repr floats: read back bit for bit
        os.replace(tmp, path)
        return len(results)

    def write_comp4(self, out_dir: str | os.PathLike, split: str, detections: list[dict]) -> list[Path]:
        """VOC devkit ``comp4_det_<split>_<class>.txt``: ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``
        per line, the file's frame, py-faster-rcnn's number format (score %.3f, boxes %.1f)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lines: dict[int, list[str]] = {label: [] for label in range(1, len(self.classes) + 1)}
        for image_id, d in zip(self.result_image_ids, detections, strict=True):
            for (x1, y1, x2, y2), score, label in zip(
                _xyxy(d["boxes"]).tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True
            ):
                if label in lines:
                    lines[label].append(f"{image_id} {score:.3f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n")
        paths = []
        for label, rows in lines.items():
            paths.append(out_dir / f"comp4_det_{split}_{safe_name(self.classes[label - 1])}.txt")
            paths[-1].write_text("".join(rows))
        return paths


def evaluate_predictions(
    dataset: DetectionDataset,
    predictions: dict[str, dict],
    metric: str | None = "auto",
    voc_pixel_convention: str = "inclusive",
    annotations: str | os.PathLike | None = None,
    model_classes: list[str] | None = None,
    with_coco_ap: bool = False,
) -> dict:
    """The metric of ``predictions`` (keyed by image id, continuous pixels of the original image) on
    ``dataset``: what the training loop and ``ssd eval`` report. ``metric``: voc07 | voc | coco |
    auto (by the data's format); ``annotations``: the COCO file of COCO-format data;
    ``model_classes``: the classes of the predictions' labels when not ``dataset.classes``. See
    :meth:`EvalSet.evaluate` for the result; ``with_coco_ap`` adds ``map_50_95`` (:func:`add_coco_ap`)."""
    evalset = EvalSet(dataset, annotations)
    detections = evalset.from_predictions(predictions, model_classes)
    result = evalset.evaluate(detections, metric, voc_pixel_convention)
    return add_coco_ap(evalset, detections, result) if with_coco_ap else result


def add_coco_ap(evalset: EvalSet, detections: list[dict], result: dict) -> dict:
    """``result`` with ``map_50_95``: COCO's AP averaged over IoU 0.50:0.95 of the same detections, on any
    data (VOC and YOLO layouts too: their ground truth as a COCO file), beside a VOC mAP@0.5."""
    coco_ap = result["map"] if result["metric"] == "coco" else evalset.evaluate(detections, "coco")["map"]
    return {**result, "map_50_95": coco_ap}


def _name_list(names: list[str], limit: int = 10) -> str:
    """``person, N/A (x10), ...`` for messages: repeats counted, at most ``limit`` names."""
    counts = Counter(names)
    shown = [name if n == 1 else f"{name} (x{n})" for name, n in list(counts.items())[:limit]]
    more = f", ... {len(counts) - limit} more" if len(counts) > limit else ""
    return ", ".join(shown) + more if shown else "none"


def class_label_map(model_classes: list[str], data_classes: list[str], where: str) -> np.ndarray:
    """``int64 [K_model + 1]``: the data label of each model label, 0 where the data has no such class.

    Matched by :func:`ssd.classes.match_classes` (by position for equal lists, else by name); the
    names that did not match are logged. ``where`` names the model in messages. Raises
    ``ValueError`` when nothing can be matched.
    """
    try:
        mapping, how = match_classes(model_classes, data_classes)
    except ValueError as e:
        raise ValueError(
            f"{where}: the model detects {len(model_classes)} classes ({_name_list(model_classes, 5)}) but data.val "
            f"has {len(data_classes)} ({_name_list(data_classes, 5)}): {e}"
        ) from None
    if how == "position" and [class_key(n) for n in model_classes] != [class_key(n) for n in data_classes]:
        log.warning(
            "%s: class names differ from data.val's (%s vs %s); labels are matched by position",
            where,
            model_classes[:3],
            data_classes[:3],
        )
    elif how == "name":
        matched = set(mapping.values())
        unknown = [n for label, n in enumerate(model_classes, 1) if label not in mapping]
        missing = [n for label, n in enumerate(data_classes, 1) if label not in matched]
        log.log(
            logging.WARNING if missing else logging.INFO,
            "%s: %d model classes matched to data.val's %d by name; "
            "not in data.val (their detections are left out): %s; "
            "in data.val but not detected by the model (AP 0): %s",
            where,
            len(mapping),
            len(data_classes),
            _name_list(unknown),
            _name_list(missing),
        )
    lookup = np.zeros(len(model_classes) + 1, np.int64)
    for model_label, data_label in mapping.items():
        lookup[model_label] = data_label
    return lookup


@overload
def relabel_predictions(predictions: dict[str, dict], lookup: np.ndarray) -> dict[str, dict]: ...
@overload
def relabel_predictions(predictions: None, lookup: np.ndarray) -> None: ...
@overload
def relabel_predictions(predictions: dict[str, dict] | None, lookup: np.ndarray) -> dict[str, dict] | None: ...
def relabel_predictions(predictions: dict[str, dict] | None, lookup: np.ndarray) -> dict[str, dict] | None:
    """Predictions in a model's labels -> in the data's (``lookup`` from :func:`class_label_map`).

    Detections of a label without a data class (``N/A``, or a class the file does not have) are left
    out, counted per model label in a warning. ``None`` (a rank other than 0) passes through.
    """
    if predictions is None:
        return None
    out: dict[str, dict] = {}
    dropped: Counter[int] = Counter()
    for image_id, d in predictions.items():
        labels = np.asarray(d["labels"], np.int64).reshape(-1)
        inside = (labels > 0) & (labels < len(lookup))
        new = np.where(inside, lookup[np.where(inside, labels, 0)], 0)
        keep = new > 0
        dropped.update(labels[~keep].tolist())
        out[image_id] = {
            "boxes": np.asarray(d["boxes"]).reshape(-1, 4)[keep],
            "scores": np.asarray(d["scores"]).reshape(-1)[keep],
            "labels": new[keep],
        }
    if dropped:
        log.warning(
            "%d detection(s) of model labels without a class in data.val were left out (label: count %s)",
            sum(dropped.values()),
            dict(dropped.most_common(10)),
        )
    return out


def evaluate_voc(
    dataset: DetectionDataset, predictions: dict[str, dict], use_07_metric: bool = True, inclusive: bool = True
) -> dict:
    """VOC mAP of ``predictions`` (VOC07 11-point or VOC2010+ area); see :func:`evaluate_predictions`."""
    return evaluate_predictions(
        dataset, predictions, "voc07" if use_07_metric else "voc", "inclusive" if inclusive else "continuous"
    )


def safe_name(name: str) -> str:
    """A class name usable in a file name (COCO's 'traffic light' keeps its space)."""
    return re.sub(r"[/\\:\0]", "_", name)
