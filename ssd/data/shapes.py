"""A synthetic detection dataset of coloured shapes, written as both a VOC tree and COCO JSON.

Small enough to generate in seconds and train on a CPU in minutes, hard enough to be a real test:
four shape classes from 8% to 60% of the image side (``min_side`` / ``max_side`` make a small-object
set), random colours kept in contrast with what lies under them, overlaps that hide at most 30% of
an earlier object, and a mildly textured background (gradient, low-frequency blotches, a few thin
lines, gaussian noise). A heavily cluttered background made a small CPU-trained model fail in a
prototype, so the clutter stays mild.

Every box is the object's real visible extent, found from its rasterised coverage after all
occlusions: integer pixel edges ``x1 < x2``, ``y1 < y2`` in ``[0, size]``, every pixel the object
touches lies in ``[x1, x2) x [y1, y2)`` and the object touches all four sides. VOC XML stores it
1-based inclusive (``xmin = x1 + 1``, ``xmax = x2``); COCO stores ``[x1, y1, x2 - x1, y2 - y1]``;
so the VOC loader's ``(xmin - 1, ymin - 1, xmax, ymax)`` and the COCO loader agree exactly.

Each image has its own generator seeded by ``(seed, split, index)``: the same arguments give
byte-identical files, and image ``train_000004`` does not depend on how many images are made.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

SHAPES_CLASSES = ["circle", "square", "triangle", "star"]
SPLITS = ("train", "val")
GENERATOR_VERSION = 1  # bump whenever the pixels or annotations change: ensure_shapes regenerates
MANIFEST = "shapes.json"

MIN_SIDE, MAX_SIDE = 0.08, 0.60  # object box side as a fraction of the image side, log-uniform
MAX_ASPECT = 1.2  # box width / height within [1 / MAX_ASPECT, MAX_ASPECT]
EMPTY_FRACTION = 0.05  # images drawn with no object at all
MIN_VISIBLE = 0.7  # a placement is rejected if it would leave an earlier object less visible than this
PLACEMENT_TRIES = 10
MIN_CONTRAST = 90.0  # RGB distance between an object's colour and the mean of what it covers
SUPERSAMPLE = 4  # shapes are filled at 4x and area-averaged: exact coverage, quantised to 1/16
JPEG_QUALITY = 90
FLAT_GREY = 127.0  # the background of textured=False renders (tests)


@dataclass
class Rendered:
    """One generated image: ``image`` uint8 [H, W, 3] (BGR), ``boxes_px`` int64 [N, 4] xyxy pixel
    edges, ``labels`` int64 [N] indices into SHAPES_CLASSES, ``visible`` float32 [N, H, W] the
    fraction of each pixel's colour each object contributes (before noise), ``drawn_area``
    float32 [N] each object's area in pixels before later objects covered part of it."""

    image: np.ndarray
    boxes_px: np.ndarray
    labels: np.ndarray
    visible: np.ndarray
    drawn_area: np.ndarray


# --- shapes ------------------------------------------------------------------------------


def _unit_polygon(label: int, rng: np.random.Generator) -> np.ndarray:
    """The outline of class ``label`` at a random orientation, ``float64 [V, 2]`` around the origin."""
    name = SHAPES_CLASSES[label]
    if name == "circle":
        angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack((np.cos(angles), np.sin(angles)), 1)
    if name == "square":
        pts, turn = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64), rng.uniform(-15, 15)  # not a diamond
    elif name == "triangle":
        angles = np.deg2rad([90, 210, 330])
        pts, turn = np.stack((np.cos(angles), np.sin(angles)), 1), rng.uniform(0, 120)
    elif name == "star":
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False) + np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.5))  # outer and inner points
        pts, turn = np.stack((np.cos(angles), np.sin(angles)), 1) * radii[:, None], rng.uniform(0, 72)
    else:
        raise ValueError(f"no outline for class {name!r}; valid: {SHAPES_CLASSES}")
    t = np.deg2rad(turn)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return pts @ rot.T


def _coverage(polygon: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Rasterise a polygon given in continuous pixel-edge coordinates.

    Returns ``(x0, y0, alpha)``: ``alpha`` float32 [h, w] is the fraction of each pixel the shape
    covers, for the pixels ``[x0, x0 + w) x [y0, y0 + h)`` of the image.
    """
    x0, y0 = np.floor(polygon.min(0)).astype(int)
    x1, y1 = np.ceil(polygon.max(0)).astype(int)
    w, h = x1 - x0, y1 - y0
    s = SUPERSAMPLE
    # cv2 puts integer vertices on pixel centres: edge coordinate p is cv2 coordinate p - 0.5
    local = ((polygon - (x0, y0)) * s - 0.5) * 16  # 4 fractional bits (shift=4)
    mask = np.zeros((h * s, w * s), np.uint8)
    cv2.fillPoly(mask, [np.round(local).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    alpha = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)  # block means at an integer factor
    return int(x0), int(y0), alpha.astype(np.float32) / 255


# --- background -------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mild texture, float32 [size, size, 3]: a colour gradient with low-frequency blotches, 0-3 thin lines."""
    grid = int(rng.integers(3, 7))
    base, ramp = rng.uniform(40, 215, 3), rng.uniform(-60, 60, 3)  # colour at the centre, change across
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.linspace(-0.5, 0.5, grid)
    t = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # [grid, grid]
    low = base + ramp * t[..., None] + rng.normal(0, rng.uniform(8, 20), (grid, grid, 3))
    # one upsampling makes both the gradient and the blotches (bicubic keeps a linear ramp linear)
    image = cv2.resize(np.clip(low, 0, 255).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):
        p, q = rng.uniform(0, size, (2, 2))
        colour = np.clip(base + rng.uniform(-70, 70, 3), 0, 255)
        thickness = int(rng.integers(1, 3))
        cv2.line(image, tuple(int(v) for v in p), tuple(int(v) for v in q), colour.tolist(), thickness, cv2.LINE_AA)
    return image


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """The first of 8 random colours at least MIN_CONTRAST from ``under``, else the farthest."""
    candidates = rng.uniform(0, 255, (8, 3))
    dist = np.linalg.norm(candidates - under, axis=1)
    ok = np.flatnonzero(dist >= MIN_CONTRAST)
    return candidates[ok[0] if ok.size else dist.argmax()].astype(np.float32)


def _shaded(rng: np.random.Generator, colour: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``colour`` with a mild linear shading (up to +-12% across the patch), float32 [h, w, 3]."""
    h, w = shape
    amount, angle = rng.uniform(0, 0.25), rng.uniform(0, 2 * np.pi)
    # [h, w]
    ramp = (
        np.cos(angle) * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
        + np.sin(angle) * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    )
    return np.clip((1 + amount * ramp)[..., None] * colour, 0, 255).astype(np.float32)


# --- one image ---------------------------------------------------------------------------


class _Canvas:
    """An image being drawn plus what is left visible of each object drawn on it so far."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image  # float32 [H, W, 3]
        self.visible: list[np.ndarray] = []  # float32 [H, W] per object: its share of each pixel's colour
        self.drawn_area: list[float] = []  # coverage in pixels when drawn
        self.visible_area: list[float] = []  # coverage left after later objects

    def hidden_by(self, region: tuple[slice, slice], alpha: np.ndarray) -> list[float] | None:
        """Area each earlier object would lose under ``alpha``; None if one would drop below MIN_VISIBLE."""
        hidden = [float((vis[region] * alpha).sum()) for vis in self.visible]
        left = zip(self.visible_area, hidden, self.drawn_area, strict=True)
        return hidden if all(now - lost >= MIN_VISIBLE * area for now, lost, area in left) else None

    def draw(
        self, rng: np.random.Generator, region: tuple[slice, slice], alpha: np.ndarray, hidden: list[float]
    ) -> None:
        """Paint a random colour through ``alpha`` at ``region``; earlier objects lose ``hidden`` area."""
        for k, vis in enumerate(self.visible):
            vis[region] *= 1 - alpha
            self.visible_area[k] -= hidden[k]
        patch = self.image[region]
        under = np.array(cv2.mean(patch, mask=(alpha > 0.5).astype(np.uint8))[:3])
        fill = _shaded(rng, _pick_colour(rng, under), alpha.shape)
        patch[:] = cv2.blendLinear(fill, patch, alpha, 1 - alpha)  # writes through into self.image
        vis = np.zeros(self.image.shape[:2], np.float32)
        vis[region] = alpha
        self.visible.append(vis)
        self.drawn_area.append(float(alpha.sum()))
        self.visible_area.append(self.drawn_area[-1])


def _place(rng: np.random.Generator, canvas: _Canvas, label: int, side: float) -> bool:
    """Draw one object of box side about ``side`` px where it hides little enough; False if no try fits."""
    size = canvas.image.shape[0]
    outline = _unit_polygon(label, rng)
    lo, hi = outline.min(0), outline.max(0)
    for _ in range(PLACEMENT_TRIES):
        aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
        w, h = min(side * math.sqrt(aspect), size - 1), min(side / math.sqrt(aspect), size - 1)
        origin = rng.uniform(0, (size - w, size - h))
        polygon = np.clip((outline - lo) / (hi - lo) * (w, h) + origin, 0, size)  # clip: float rounding only
        x0, y0, alpha = _coverage(polygon)
        region = np.s_[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
        hidden = canvas.hidden_by(region, alpha)
        if hidden is not None:
            canvas.draw(rng, region, alpha, hidden)
            return True
    return False


def render_image(
    rng: np.random.Generator,
    size: int = 300,
    max_objects: int = 6,
    textured: bool = True,
    min_side: float = MIN_SIDE,
    max_side: float = MAX_SIDE,
) -> Rendered:
    """Draw one image. ``textured=False`` gives a flat grey background without lines or noise
    (tests use it to check that boxes match the drawn pixels exactly). Object box sides are drawn
    log-uniform in ``[min_side, max_side]`` of the image side."""
    canvas = _Canvas(_background(rng, size) if textured else np.full((size, size, 3), FLAT_GREY, np.float32))
    num = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, max_objects + 1))
    labels = rng.integers(0, len(SHAPES_CLASSES), num)
    # log-uniform sides, largest drawn first so small objects sit on top rather than being buried
    sides = np.sort(np.exp(rng.uniform(math.log(min_side), math.log(max_side), num)))[::-1] * size
    placed = [int(label) for label, side in zip(labels, sides, strict=True) if _place(rng, canvas, int(label), side)]
    image = canvas.image
    if textured:
        # cv2.randn is 5x faster than numpy's normals here; its generator is thread-local and
        # seeded from ours, so the noise stays a function of (seed, split, index)
        noise = np.empty_like(image)
        cv2.setRNGSeed(int(rng.integers(2**31)))
        cv2.randn(noise, 0, rng.uniform(2, 8))  # type: ignore[call-overload]  # cv2's stubs: no scalar mean/stddev
        image += noise
    return Rendered(
        image=cv2.add(image, 0.0, dtype=cv2.CV_8U),  # rounds and saturates to [0, 255]
        boxes_px=np.array([_extent(vis) for vis in canvas.visible], np.int64).reshape(-1, 4),
        labels=np.array(placed, np.int64),
        visible=np.stack(canvas.visible) if placed else np.zeros((0, size, size), np.float32),
        drawn_area=np.array(canvas.drawn_area, np.float32),
    )


def _extent(vis: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel-edge box ``(x1, y1, x2, y2)`` of the pixels where ``vis > 0``."""
    cols, rows = np.flatnonzero(vis.any(0)), np.flatnonzero(vis.any(1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --- files -------------------------------------------------------------------------------


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _voc_xml(image_id: str, size: int, boxes_px: np.ndarray, labels: np.ndarray) -> bytes:
    """PASCAL VOC annotation; coordinates 1-based inclusive (``xmin = x1 + 1``, ``xmax = x2``)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "shapes"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    for (x1, y1, x2, y2), label in zip(boxes_px.tolist(), labels.tolist(), strict=True):
        obj = ET.SubElement(root, "object")
        fields = (("name", SHAPES_CLASSES[label]), ("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0"))
        for tag, text in fields:
            ET.SubElement(obj, tag).text = text
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_split(
    out: Path, split: str, num: int, size: int, seed: int, max_objects: int, sides: tuple[float, float]
) -> dict:
    """Write one split's images, XMLs, id list and COCO JSON; returns its summary."""
    coco: dict[str, Any] = {
        "info": {"description": "synthetic shapes", "version": str(GENERATOR_VERSION)},
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES_CLASSES)],
    }
    per_class = dict.fromkeys(SHAPES_CLASSES, 0)
    ids, empty = [], 0
    for index in range(num):
        image_id = f"{split}_{index:06d}"
        r = render_image(_image_rng(seed, split, index), size, max_objects, min_side=sides[0], max_side=sides[1])
        jpeg = out / "JPEGImages" / f"{image_id}.jpg"
        if not cv2.imwrite(str(jpeg), r.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"cv2 could not write {jpeg}")
        (out / "Annotations" / f"{image_id}.xml").write_bytes(_voc_xml(image_id, size, r.boxes_px, r.labels))
        coco["images"].append({"id": index + 1, "file_name": f"{image_id}.jpg", "width": size, "height": size})
        for (x1, y1, x2, y2), label in zip(r.boxes_px.tolist(), r.labels.tolist(), strict=True):
            w, h = x2 - x1, y2 - y1
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            per_class[SHAPES_CLASSES[label]] += 1
        ids.append(image_id)
        empty += len(r.labels) == 0
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return {"images": num, "empty_images": empty, "objects": len(coco["annotations"]), "objects_per_class": per_class}


def _remove_stale(out: Path, split: str, num: int) -> None:
    """Delete this generator's files of ``split`` numbered ``num`` or more (left by a bigger run)."""
    for folder, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        for path in (out / folder).glob(f"{split}_*{ext}"):
            index = path.stem[len(split) + 1 :]
            if index.isdigit() and int(index) >= num:
                path.unlink()


def _parameters(
    num_train: int, num_val: int, size: int, seed: int, max_objects: int, sides: tuple[float, float]
) -> dict:
    params = {
        "version": GENERATOR_VERSION,
        "classes": SHAPES_CLASSES,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
        "max_objects": max_objects,
    }
    # only then: the manifests of default datasets written before the option stay valid
    if sides != (MIN_SIDE, MAX_SIDE):
        params["min_side"], params["max_side"] = sides
    return params


def generate_shapes(
    out: str | os.PathLike,
    num_train: int,
    num_val: int,
    size: int = 300,
    seed: int = 0,
    max_objects: int = 6,
    min_side: float = MIN_SIDE,
    max_side: float = MAX_SIDE,
) -> dict:
    """Write the shapes dataset under ``out`` as a VOC tree and COCO JSON describing the same images.

    ``out/JPEGImages/<id>.jpg``, ``out/Annotations/<id>.xml``, ``out/ImageSets/Main/{train,val}.txt``,
    ``out/annotations/instances_{train,val}.json`` (COCO ``file_name`` relative to JPEGImages), and
    last ``out/shapes.json`` with the parameters. Ids are ``train_000000``, ``val_000000``, ...
    ``min_side`` / ``max_side``: the range of object box sides as fractions of the image side (e.g.
    0.03..0.08 for a small-object set). Returns a summary:
    ``{"path", "splits": {split: {"images", "empty_images", "objects", "objects_per_class"}}}``.
    """
    if size < 32 or max_objects < 0 or num_train < 0 or num_val < 0:
        raise ValueError(
            f"need size >= 32 and non-negative counts, got size={size}, num_train={num_train}, "
            f"num_val={num_val}, max_objects={max_objects}"
        )
    if not 0 < min_side <= max_side <= 1 or min_side * size < 2:
        raise ValueError(
            f"object sides: need 0 < min_side <= max_side <= 1 and min_side * size >= 2 px, got "
            f"min_side={min_side}, max_side={max_side} at size {size}"
        )
    out = Path(out)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted run must not look complete
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main", "annotations"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = {}
    for split, num in zip(SPLITS, (num_train, num_val), strict=True):
        _remove_stale(out, split, num)
        splits[split] = _write_split(out, split, num, size, seed, max_objects, (min_side, max_side))
    params = _parameters(num_train, num_val, size, seed, max_objects, (min_side, max_side))
    (out / MANIFEST).write_text(json.dumps(params, indent=1) + "\n")
    log.info("wrote %d shapes images to %s in %.1f s", num_train + num_val, out, time.perf_counter() - start)
    return {"path": str(out), "splits": splits}


def ensure_shapes(
    out: str | os.PathLike,
    num_train: int,
    num_val: int,
    size: int = 300,
    seed: int = 0,
    max_objects: int = 6,
    min_side: float = MIN_SIDE,
    max_side: float = MAX_SIDE,
) -> Path:
    """``out`` holding a complete shapes dataset with these parameters, generated only if it does not yet."""
    out = Path(out)
    try:
        found = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        found = None
    if found != _parameters(num_train, num_val, size, seed, max_objects, (min_side, max_side)):
        generate_shapes(out, num_train, num_val, size, seed, max_objects, min_side, max_side)
    return out
