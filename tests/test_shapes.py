"""ssd.data.shapes: determinism, VOC/COCO agreement, box validity and tightness, ensure_shapes caching."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from ssd.data import shapes
from ssd.data.shapes import FLAT_GREY, MIN_VISIBLE, SHAPES_CLASSES, ensure_shapes, generate_shapes, render_image

SIZE = 300
NUM_TRAIN, NUM_VAL = 100, 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """100 + 20 images at 300 px (about 1.5 s)."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, NUM_TRAIN, NUM_VAL, size=SIZE, seed=3)
    return out


def file_hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def voc_boxes(root: Path, image_id: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(name, xyxy pixel edges) per object, read the way the VOC loader does: (xmin - 1, ymin - 1, xmax, ymax)."""
    objects = []
    for obj in ET.parse(root / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
        b = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (int(b.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((obj.findtext("name"), (xmin - 1, ymin - 1, xmax, ymax)))
    return objects


def all_voc_objects(root: Path, split: str) -> list[list[tuple[str, tuple[int, int, int, int]]]]:
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    return [voc_boxes(root, i) for i in ids]


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_shapes(tmp_path / name, 6, 3, size=128, seed=seed)
    a, b, c = (file_hashes(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 9 + 2 + 2 + 1  # jpg + xml per image, 2 id lists, 2 COCO files, manifest
    assert a == b
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in images)


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path):
    generate_shapes(tmp_path / "few", 5, 1, size=128)
    generate_shapes(tmp_path / "more", 10, 2, size=128)
    few, more = file_hashes(tmp_path / "few"), file_hashes(tmp_path / "more")
    per_image = [k for k in few if k.startswith(("JPEGImages", "Annotations"))]
    assert len(per_image) == 12
    assert all(few[k] == more[k] for k in per_image)


def test_voc_and_coco_describe_the_same_boxes(dataset):
    for split, num in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == SHAPES_CLASSES
        assert sorted(coco.getCatIds()) == list(range(1, len(SHAPES_CLASSES) + 1))
        ids = (dataset / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert ids == [f"{split}_{i:06d}" for i in range(num)]
        assert sorted(coco.getImgIds()) == list(range(1, num + 1))
        for image_info in coco.loadImgs(sorted(coco.getImgIds())):
            image_id = image_info["file_name"].removesuffix(".jpg")
            assert image_id == ids[image_info["id"] - 1]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
            from_coco = []
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert ann["area"] == w * h and ann["iscrowd"] == 0
                from_coco.append((coco.cats[ann["category_id"]]["name"], (x, y, x + w, y + h)))
            assert from_coco == voc_boxes(dataset, image_id)


def test_boxes_are_valid_and_varied(dataset):
    images = all_voc_objects(dataset, "train") + all_voc_objects(dataset, "val")
    boxes = np.array([box for objects in images for _, box in objects])  # [N, 4]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= SIZE).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() < 0.15 * SIZE
    assert np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max() > 0.45 * SIZE
    names = {name for objects in images for name, _ in objects}
    assert names == set(SHAPES_CLASSES)
    counts = [len(objects) for objects in images]
    assert min(counts) == 0 and max(counts) <= 6
    assert sum(c >= 3 for c in counts) >= len(counts) // 4


def test_summary_counts_match_the_files(tmp_path):
    summary = generate_shapes(tmp_path, 8, 4, size=128, seed=5)
    for split, num in (("train", 8), ("val", 4)):
        objects = all_voc_objects(tmp_path, split)
        stats = summary["splits"][split]
        assert stats["images"] == num
        assert stats["objects"] == sum(len(o) for o in objects)
        assert stats["empty_images"] == sum(len(o) == 0 for o in objects)
        assert stats["objects_per_class"] == {c: sum(n == c for o in objects for n, _ in o) for c in SHAPES_CLASSES}


@pytest.mark.parametrize("seed", range(8))
def test_drawn_pixels_fill_their_boxes_exactly(seed):
    """On a flat background every changed pixel lies in a box and each box's changed pixels touch its 4 sides."""
    r = render_image(np.random.default_rng(seed), size=160, max_objects=6, textured=False)
    changed = (r.image != FLAT_GREY).any(-1)  # [H, W]
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in r.boxes_px.tolist():
        inside[y1:y2, x1:x2] = True
        box = changed[y1:y2, x1:x2]
        # 1 px tolerance: a corner of coverage 1/16 under a later object's anti-aliased edge may round to grey
        assert box[:2].any() and box[-2:].any() and box[:, :2].any() and box[:, -2:].any(), (seed, (x1, y1, x2, y2))
    assert not (changed & ~inside).any()


def test_objects_stay_mostly_visible():
    for seed in range(20):
        r = render_image(np.random.default_rng(seed), size=160)
        fraction = r.visible.sum((1, 2)) / r.drawn_area
        assert (fraction >= MIN_VISIBLE - 1e-4).all(), (seed, fraction)
        assert (r.visible[:, :, :] <= 1).all() and (r.visible >= 0).all()


def test_jpegs_decode_to_the_declared_size(dataset):
    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    for info in coco["images"]:
        image = cv2.imread(str(dataset / "JPEGImages" / info["file_name"]))
        assert image.shape == (info["height"], info["width"], 3) == (SIZE, SIZE, 3)
        size = ET.parse(dataset / "Annotations" / info["file_name"].replace(".jpg", ".xml")).getroot().find("size")
        assert (int(size.findtext("width")), int(size.findtext("height"))) == (SIZE, SIZE)


def test_ensure_shapes_generates_only_when_needed(tmp_path, monkeypatch):
    calls = []
    real = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda *args: calls.append(args) or real(*args))
    out = tmp_path / "ds"
    assert ensure_shapes(out, 6, 2, size=96, seed=0) == out
    assert len(calls) == 1 and (out / "shapes.json").is_file()
    ensure_shapes(out, 6, 2, size=96, seed=0)
    assert len(calls) == 1
    ensure_shapes(out, 4, 2, size=96, seed=0)  # fewer images: regenerated, the extra ones removed
    assert len(calls) == 2
    assert sorted(p.name for p in (out / "JPEGImages").glob("train_*")) == [f"train_{i:06d}.jpg" for i in range(4)]
    (out / "shapes.json").unlink()  # as if interrupted before the end
    ensure_shapes(out, 4, 2, size=96, seed=0)
    assert len(calls) == 3
    ensure_shapes(out, 4, 2, size=96, seed=1)
    assert len(calls) == 4
    assert json.loads((out / "shapes.json").read_text())["seed"] == 1


def test_small_object_option_bounds_the_box_sides_and_keeps_default_manifests(tmp_path):
    generate_shapes(tmp_path / "small", 20, 0, size=160, seed=0, min_side=0.04, max_side=0.08)
    boxes = np.array([box for objects in all_voc_objects(tmp_path / "small", "train") for _, box in objects])  # [N, 4]
    sides = boxes[:, 2:] - boxes[:, :2]
    assert len(sides) > 40
    # a side never exceeds max_side (aspect, pixel edges)
    assert sides.max() <= 0.08 * 160 * np.sqrt(shapes.MAX_ASPECT) + 1
    assert 2 <= sides.min() and np.median(sides) < 0.08 * 160
    manifest = json.loads((tmp_path / "small" / "shapes.json").read_text())
    assert (manifest["min_side"], manifest["max_side"]) == (0.04, 0.08)
    generate_shapes(tmp_path / "default", 2, 0, size=64, seed=0)
    # manifests written before stay valid
    assert "min_side" not in json.loads((tmp_path / "default" / "shapes.json").read_text())
    with pytest.raises(ValueError, match="min_side=0.01, max_side=0.08 at size 160"):
        generate_shapes(tmp_path / "bad", 1, 0, size=160, min_side=0.01, max_side=0.08)  # 1.6 px objects
