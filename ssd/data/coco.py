"""COCO layout: an images folder and an ``instances_*.json`` read with pycocotools.

Labels are contiguous (1..K in the order of ``classes``, by default the file's categories sorted
by id); :func:`label_to_category_id` maps back for writing results. ``iscrowd`` boxes are kept as
``difficult`` (excluded from training, kept for evaluation, where COCOeval ignores them anyway).
The EXIF orientation rule is orientation.py's: an image's ``width``/``height`` tell the frame its
boxes were drawn in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ssd.classes import unlisted_class_hint, unlisted_kind
from ssd.data.orientation import AS_STORED, Headers, choose_frame
from ssd.data.records import DatasetError, ImageRecord, Problems, sanitize_boxes


def load_coco(annotations: str | os.PathLike):
    """pycocotools ``COCO`` for a file, quietly, with errors naming the file."""
    from pycocotools.coco import COCO

    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON ({e})") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None


def coco_classes(coco) -> list[str]:
    return [c["name"] for c in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])]


def category_mapping(coco, classes: list[str], where: str, ignore_other_classes: bool = False) -> dict[int, int]:
    """COCO category id -> contiguous label (1-based index in ``classes``), matched by name.

    A category not in ``classes`` raises, or with ``ignore_other_classes`` has no label."""
    by_name = {name: i + 1 for i, name in enumerate(classes)}
    mapping = {}
    for cat in coco.loadCats(coco.getCatIds()):
        if cat["name"] in by_name:
            mapping[cat["id"]] = by_name[cat["name"]]
        elif not ignore_other_classes:
            raise DatasetError(
                f"{where}: category {cat['name']!r} (id {cat['id']}) is not in classes {classes[:5]}"
                f"{'...' if len(classes) > 5 else ''}{unlisted_class_hint(cat['name'], classes, skip_hint=False)}"
            )
    return mapping


def label_to_category_id(coco, classes: list[str]) -> dict[int, int]:
    """Contiguous label -> the file's own category id (for COCO results files and ``catIds``), by name:
    a label whose name the file lacks has none, a category not in ``classes`` is not scored."""
    return {
        label: cid for cid, label in category_mapping(coco, classes, "categories", ignore_other_classes=True).items()
    }


def index_coco(
    images: str | os.PathLike,
    annotations: str | os.PathLike,
    classes: list[str] | None,
    problems: Problems,
    ignore_other_classes: bool = False,
) -> tuple[list[ImageRecord], list[str]]:
    """Index a COCO split. Returns ``(records, classes)``. With ``ignore_other_classes`` the objects of
    categories not in ``classes`` are dropped and counted per class; without it such a category raises."""
    coco = load_coco(annotations)
    classes = list(classes) if classes else coco_classes(coco)
    cat_to_label = category_mapping(coco, classes, str(annotations), ignore_other_classes)
    unlisted = {cid: cat["name"] for cid, cat in coco.cats.items() if cid not in cat_to_label}
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: COCO images folder not found")
    records = []
    headers = Headers()
    for img_id in sorted(coco.getImgIds()):
        info = coco.imgs[img_id]
        where = f"{annotations} image id {img_id} ({info.get('file_name')})"
        path = img_dir / info.get("file_name", "")
        if not path.is_file():
            problems.report("missing image", str(path), f"image of id {img_id} not found")
            continue
        width, height = int(info.get("width", 0)), int(info.get("height", 0))
        if width <= 0 or height <= 0:
            problems.report("bad image size", where, f"width/height {width}x{height} must be positive")
            continue
        try:
            orientation, _ = choose_frame(headers(path), (width, height), problems, str(path))
        except OSError:
            orientation = AS_STORED  # decoding reports the file, as for any image
        anns = coco.imgToAnns.get(img_id, [])
        boxes, labels, crowd = [], [], []
        for ann in anns:
            bbox = ann.get("bbox")
            if bbox is None or len(bbox) != 4:
                problems.report("malformed annotation", where, f"annotation {ann.get('id')} has bbox {bbox!r}")
                continue
            if ann.get("category_id") in unlisted:
                problems.fix(unlisted_kind(unlisted[ann["category_id"]]), where)
                continue
            if ann.get("category_id") not in cat_to_label:
                problems.report(
                    "unknown class",
                    where,
                    f"annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}",
                )
                continue
            x, y, w, h = (float(v) for v in bbox)
            boxes.append((x, y, x + w, y + h))
            labels.append(cat_to_label[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        source = np.asarray(boxes, np.float64).reshape(-1, 4)
        pixel, keep = sanitize_boxes(source.astype(np.float32), width, height, problems, where)
        records.append(
            ImageRecord(
                image_id=str(img_id),
                path=str(path),
                width=width,
                height=height,
                boxes=pixel[keep],
                labels=np.asarray(labels, np.int64)[keep],
                difficult=np.asarray(crowd, bool)[keep],
                source_boxes=source[keep],
                coco_id=img_id,
                orientation=orientation,
            )
        )
    headers.save()
    return records, classes
