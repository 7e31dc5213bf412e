"""EXIF orientation: generated JPEG / PNG files carrying each tag 1-8 are turned upright as PIL's
``exif_transpose`` and OpenCV's ``imread`` (what Ultralytics trains on) turn them; YOLO labels are
read upright; a VOC / COCO annotation is read in the frame its size matches; ``ssd data check``
lists the rotated and the undecidable images; the header cache notices a re-tagged file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from ssd.config import DatasetConfig
from ssd.data.check import check_split, format_report
from ssd.data.dataset import DetectionDataset, read_image
from ssd.data.orientation import READ_AS_STORED, READ_UPRIGHT, UNDECIDABLE
from ssd.data.records import DatasetError, Problems
from ssd.data.yolo import index_yolo

ORIENTATIONS = range(1, 9)
STORED_W, STORED_H = 64, 40
BLOCK = (8, 4, 24, 14)  # x1, y1, x2, y2 of the bright block in the stored frame


def stored_pixels(width: int = STORED_W, height: int = STORED_H) -> np.ndarray:
    """A dark RGB image with one bright block at ``BLOCK`` and a ramp that tells every flip apart."""
    image = np.full((height, width, 3), 30, np.uint8)
    image[..., 2] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
    image[..., 1] = np.linspace(0, 120, height, dtype=np.uint8)[:, None]
    x1, y1, x2, y2 = BLOCK
    image[y1:y2, x1:x2] = 240
    return image


def write_tagged(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    """``pixels`` stored as they are, with an EXIF orientation tag (none for 1); JPEG or PNG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **options)
    return path


def block_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """Continuous pixel box of the bright block in a decoded image."""
    ys, xs = np.nonzero(image.min(axis=2) > 180)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_pixels_turn_upright_as_pil_and_opencv_turn_them(tmp_path, suffix):
    pixels = stored_pixels()
    for orientation in ORIENTATIONS:
        path = write_tagged(tmp_path / f"o{orientation}{suffix}", pixels, orientation)
        ours = read_image(str(path))
        with Image.open(path) as im:
            pil = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        if suffix == ".png":  # lossless: the exact pixels
            np.testing.assert_array_equal(ours, pil, err_msg=f"orientation {orientation}")
        else:  # PIL's and OpenCV's JPEG decoders differ by a few levels; the geometry must not
            assert ours.shape == pil.shape and block_box(ours) == block_box(pil), orientation
            assert np.abs(ours.astype(int) - pil).mean() < 2.0, orientation
            opencv = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # applies the tag to JPEGs
            np.testing.assert_array_equal(ours, opencv, err_msg=f"orientation {orientation}")
        assert read_image(str(path), 1).shape == (STORED_H, STORED_W, 3)  # as stored on request
        turned = orientation >= 5
        assert ours.shape[:2] == ((STORED_W, STORED_H) if turned else (STORED_H, STORED_W)), orientation


def upright_block(orientation: int) -> tuple[int, int, int, int]:
    """Where PIL puts the block once ``orientation`` is applied (lossless PNG, an independent reference)."""
    pixels = stored_pixels()
    mask = np.zeros_like(pixels)
    x1, y1, x2, y2 = BLOCK
    mask[y1:y2, x1:x2] = 255
    image = Image.fromarray(mask)
    image.getexif()[0x0112] = orientation
    return block_box(np.asarray(ImageOps.exif_transpose(image)))


def sample(records, index: int = 0) -> dict:
    return DetectionDataset(records, ["block"])[index]


def assert_box_on_block(item: dict) -> None:
    """The record's box sits exactly on the bright block of the decoded pixels."""
    assert len(item["boxes"]) == 1
    np.testing.assert_allclose(item["boxes"][0], block_box(item["image"]), atol=0.5)


def test_yolo_labels_are_read_upright_for_every_tag(tmp_path):
    root = tmp_path / "yolo"
    for orientation in ORIENTATIONS:
        write_tagged(root / "images" / "train" / f"o{orientation}.jpg", stored_pixels(), orientation)
        x1, y1, x2, y2 = upright_block(orientation)
        w, h = (STORED_H, STORED_W) if orientation >= 5 else (STORED_W, STORED_H)
        label = root / "labels" / "train" / f"o{orientation}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n")
    problems = Problems("raise")
    records = index_yolo(root, "train", ["block"], problems)
    assert [r.orientation for r in records] == list(ORIENTATIONS)
    for i, rec in enumerate(records):
        item = sample(records, i)
        assert item["image"].shape[:2] == (rec.height, rec.width)
        assert_box_on_block(item)
    assert problems.notes == {READ_UPRIGHT: 7}
    assert [Path(p).stem for p in problems.examples[READ_UPRIGHT]] == [f"o{o}" for o in range(2, 9)]


def voc_tree(root: Path, images: dict[str, tuple[int, tuple[int, int] | None, tuple]], square: bool = False) -> Path:
    """``{id: (orientation, annotated (w, h) or None, box in that frame)}`` -> a VOC tree of tagged JPEGs."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    pixels = stored_pixels(STORED_W, STORED_W) if square else stored_pixels()
    for image_id, (orientation, size, (x1, y1, x2, y2)) in images.items():
        write_tagged(root / "JPEGImages" / f"{image_id}.jpg", pixels, orientation)
        size_xml = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>{size_xml}<object><name>block</name><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>"
        )
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in images))
    return root


def test_voc_annotation_is_read_in_the_frame_its_size_matches(tmp_path):
    upright_size, stored_size = (STORED_H, STORED_W), (STORED_W, STORED_H)
    root = voc_tree(
        tmp_path / "voc",
        {
            "upright": (6, upright_size, upright_block(6)),
            "stored": (6, stored_size, BLOCK),  # drawn by a tool that ignored the tag
            "stored8": (8, stored_size, BLOCK),
            "flipped": (3, stored_size, upright_block(3)),  # 180 degrees keeps the size: undecidable
            "nosize": (5, None, upright_block(5)),
            "plain": (1, stored_size, BLOCK),
        },
    )
    cfg = DatasetConfig(root=str(root), split="train", classes=["block"])
    report, records, _ = check_split(cfg, "data.train")
    by_id = {r.image_id: r for r in records}
    assert {i: (r.orientation, r.width, r.height) for i, r in by_id.items()} == {
        "upright": (6, *upright_size),
        "stored": (1, *stored_size),
        "stored8": (1, *stored_size),
        "flipped": (3, *stored_size),
        "nosize": (5, *upright_size),
        "plain": (1, *stored_size),
    }
    for i in range(len(records)):
        assert_box_on_block(sample(records, i))
    notes = report.problems.notes
    assert notes == {READ_UPRIGHT: 1, READ_AS_STORED: 2, UNDECIDABLE: 2} and report.ok
    text = format_report(report, every=True)
    for image_id, kind in [("upright", READ_UPRIGHT), ("stored8", READ_AS_STORED), ("nosize", UNDECIDABLE)]:
        assert f"{kind}:" in text and f"{root / 'JPEGImages' / image_id}.jpg" in text
    assert f"1 x {READ_UPRIGHT}, e.g. {root / 'JPEGImages' / 'upright.jpg'}" in format_report(report)


def test_square_images_and_sizes_that_fit_neither_frame(tmp_path):
    side = (STORED_W, STORED_W)
    root = voc_tree(
        tmp_path / "voc", {"square": (6, side, upright_block(6)), "wrong": (6, (50, 50), (1, 1, 9, 9))}, square=True
    )
    cfg = DatasetConfig(root=str(root), split="train", classes=["block"])
    report, records, _ = check_split(cfg, "data.train", decode_images=False)
    square, wrong = records
    assert (square.orientation, wrong.orientation) == (6, 6) and report.problems.notes == {UNDECIDABLE: 1}
    assert sample(records, 0)["image"].shape == (STORED_W, STORED_W, 3)
    with pytest.raises(DatasetError, match=r"wrong.jpg: image is 64x64 upright \(EXIF orientation 6\) but its "):
        sample(records, 1)


def test_coco_annotation_is_read_in_the_frame_its_size_matches(tmp_path):
    from ssd.data.coco import index_coco

    images = tmp_path / "images"
    write_tagged(images / "a.jpg", stored_pixels(), 8)
    write_tagged(images / "b.jpg", stored_pixels(), 8)
    x1, y1, x2, y2 = upright_block(8)
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": STORED_W, "height": STORED_H},
            {"id": 2, "file_name": "b.jpg", "width": STORED_H, "height": STORED_W},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [8, 4, 16, 10]},
            {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]},
        ],
        "categories": [{"id": 1, "name": "block"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    problems = Problems("raise")
    records, _ = index_coco(images, tmp_path / "instances.json", None, problems)
    assert [(r.orientation, r.width, r.height) for r in records] == [(1, STORED_W, STORED_H), (8, STORED_H, STORED_W)]
    assert problems.notes == {READ_AS_STORED: 1, READ_UPRIGHT: 1}
    for i in range(2):
        assert_box_on_block(sample(records, i))


def test_header_cache_notices_a_retagged_image(tmp_path, cache_dir):
    root = tmp_path / "yolo"
    path = write_tagged(root / "images" / "train" / "a.jpg", stored_pixels(), 6)
    first = index_yolo(root, "train", ["block"], Problems("raise"))
    assert [p.name.split("-")[0] for p in cache_dir.iterdir()] == ["headers"]
    again = index_yolo(root, "train", ["block"], Problems("raise"))
    assert (first[0].orientation, again[0].orientation, again[0].width) == (6, 6, STORED_H)
    st = path.stat()
    write_tagged(path, stored_pixels(), 1)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    third = index_yolo(root, "train", ["block"], Problems("raise"))
    assert (third[0].orientation, third[0].width, third[0].height) == (1, STORED_W, STORED_H)
