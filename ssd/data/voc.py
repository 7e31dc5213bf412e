"""PASCAL VOC layout: ``Annotations/<id>.xml``, ``JPEGImages/<id>.<ext>``, ``ImageSets/Main/<split>.txt``.

Images are found by id and any common extension, not by the XML's ``<filename>`` (real exports
often get it wrong). Tags may come in any order; a missing ``<difficult>`` means 0. Parsed
annotations and image headers are cached per file keyed by (mtime, size) (filecache.py), so
re-indexing VOC07 test (4952 images) costs two stats per image; a changed file is always re-read.
The EXIF orientation rule is orientation.py's: ``<size>`` tells the frame the boxes were drawn in.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ssd.classes import unlisted_class_hint, unlisted_kind
from ssd.data.filecache import StatCache
from ssd.data.orientation import AS_STORED, Headers, choose_frame
from ssd.data.records import ImageRecord, Problems, sanitize_boxes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_split(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        available = (
            sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
            if (root / "ImageSets" / "Main").is_dir()
            else []
        )
        raise FileNotFoundError(
            f"{path}: split file not found" + (f"; available splits: {', '.join(available[:10])}" if available else "")
        )
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return ids


def parse_voc_xml(path: Path) -> dict:
    """One VOC XML -> {"size": (w, h) or None, "objects": [(name, difficult, (xmin, ymin, xmax, ymax))]}.

    Raises ``ValueError`` with the reason on malformed XML or a missing/non-numeric coordinate.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"malformed XML ({e})") from None
    size = None
    size_el = root.find("size")
    if size_el is not None:
        try:
            w, h = int(float(size_el.findtext("width", "0"))), int(float(size_el.findtext("height", "0")))
            size = (w, h) if w > 0 and h > 0 else None
        except ValueError:
            size = None
    objects = []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"object {i} ({name!r}) has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):  # found by name: tag order varies in real exports
            text = bnd.findtext(tag)
            try:
                coords.append(float(text or ""))  # no tag (None) or an empty one: ValueError
            except (TypeError, ValueError):
                raise ValueError(f"object {i} ({name!r}) has no numeric <{tag}> (got {text!r})") from None
        objects.append((name, difficult, tuple(coords)))
    return {"size": size, "objects": objects}


def index_voc(
    root: str | os.PathLike,
    split: str,
    classes: list[str],
    problems: Problems,
    use_cache: bool = True,
    ignore_other_classes: bool = False,
) -> list[ImageRecord]:
    """Index one VOC (root, split). Labels are 1-based positions in ``classes``. An object of a class
    not in ``classes`` is a problem, or with ``ignore_other_classes`` dropped and counted per class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: VOC root folder not found (expected Annotations/, JPEGImages/, ImageSets/Main/)"
        )
    ids = read_split(root, split)
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    images: dict[str, str] = {}
    if img_dir.is_dir():
        with os.scandir(img_dir) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    images.setdefault(stem, entry.path)
    label_of = {name: i + 1 for i, name in enumerate(classes)}
    cache = StatCache("voc", ann_dir, parse_voc_xml) if use_cache else None
    headers = Headers()
    records = []
    for image_id in ids:
        xml = ann_dir / f"{image_id}.xml"
        if image_id not in images:
            problems.report(
                "missing image", str(img_dir / f"{image_id}.*"), f"no image for id {image_id!r} in {img_dir}"
            )
            continue
        if not xml.is_file():
            problems.report("missing annotation", str(xml), "annotation file not found")
            continue
        try:
            parsed = cache.get(xml) if cache else parse_voc_xml(xml)
        except ValueError as e:
            problems.report("malformed annotation", str(xml), str(e))
            continue
        try:
            orientation, size = choose_frame(headers(images[image_id]), parsed["size"], problems, images[image_id])
        except OSError as e:
            if parsed["size"] is None:
                problems.report("unreadable image", images[image_id], f"cannot read the image header ({e})")
                continue
            orientation, size = AS_STORED, parsed["size"]  # decoding reports the file, as for any image
        boxes, labels, difficult = [], [], []
        for name, diff, coords in parsed["objects"]:
            if name not in label_of:
                if ignore_other_classes:
                    problems.fix(unlisted_kind(name), str(xml))
                else:
                    problems.report(
                        "unknown class",
                        str(xml),
                        f"object class {name!r} is not in classes "
                        f"{classes[:5]}{'...' if len(classes) > 5 else ''}{unlisted_class_hint(name, classes)}",
                    )
                continue
            boxes.append(coords)
            labels.append(label_of[name])
            difficult.append(diff)
        source = np.asarray(boxes, np.float64).reshape(-1, 4)
        pixel = source.astype(np.float32)
        pixel[:, :2] -= 1.0  # 1-based inclusive -> continuous 0-based edges (see records.py)
        pixel, keep = sanitize_boxes(pixel, size[0], size[1], problems, str(xml))
        records.append(
            ImageRecord(
                image_id=image_id,
                path=images[image_id],
                width=size[0],
                height=size[1],
                boxes=pixel[keep],
                labels=np.asarray(labels, np.int64)[keep],
                difficult=np.asarray(difficult, bool)[keep],
                source_boxes=source[keep],
                orientation=orientation,
            )
        )
    if cache:
        cache.save()
    headers.save()
    return records
