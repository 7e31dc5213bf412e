"""ssd.data.voc / coco / dataset: indexing real files on disk, the box convention, difficult and
crowd objects, the raise / skip policy for bad data (every message names the file), and the
per-XML annotation cache."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssd.config import AugmentConfig, ConfigError, DatasetConfig, PreprocessConfig
from ssd.data import voc
from ssd.data.coco import index_coco, label_to_category_id, load_coco
from ssd.data.dataset import DetectionDataset, build_dataset, collate, index_dataset, read_image
from ssd.data.records import DatasetError, Problems
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.data.transforms import build_transforms

SIZE = 96
NUM_TRAIN, NUM_VAL = 12, 6


@pytest.fixture(scope="module")
def shapes_tree(tmp_path_factory) -> Path:
    """12 train + 6 val shapes images at 96 px, VOC tree and COCO JSON (about 0.1 s). Read only."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, NUM_TRAIN, NUM_VAL, size=SIZE, seed=1)
    return out


@pytest.fixture
def shapes_copy(shapes_tree, tmp_path) -> Path:
    """A private, editable copy of the shapes tree."""
    return Path(shutil.copytree(shapes_tree, tmp_path / "shapes"))


# --- hand-made files --------------------------------------------------------------------------


def write_jpeg(path: Path, width: int, height: int) -> np.ndarray:
    """A real JPEG of a colour gradient; returns the BGR pixels written."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    image = np.stack(
        [
            np.broadcast_to(x, (height, width)),
            np.broadcast_to(y, (height, width)),
            np.full((height, width), 90, np.float32),
        ],
        -1,
    ).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return image


def obj_xml(name: str, box: tuple, difficult: int | None = 0) -> str:
    xmin, ymin, xmax, ymax = box
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (
        f"<object><name>{name}</name>{diff}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def voc_xml(objects: list[str], size: tuple[int, int] | None = (64, 48), filename: str = "whatever.jpg") -> str:
    size_xml = (
        "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{''.join(objects)}</annotation>"


def make_voc(
    root: Path, annotations: dict[str, str], image_size: tuple[int, int] = (64, 48), split: str = "train"
) -> Path:
    """A VOC tree: one JPEG of ``image_size`` (w, h) and the given XML text per id, and the split file."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for image_id, text in annotations.items():
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", *image_size)
        (root / "Annotations" / f"{image_id}.xml").write_text(text)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in annotations))
    return root


def write_coco(
    path: Path, images: list[tuple[int, str, int, int]], annotations: list[dict], categories: list[dict]
) -> Path:
    """A COCO instances JSON; writes a real JPEG next to it (in ``images/``) for every image entry."""
    for _, file_name, w, h in images:
        write_jpeg(path.parent / "images" / file_name, w, h)
    anns = [{"id": i + 1, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3], **a} for i, a in enumerate(annotations)]
    data = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": anns,
        "categories": categories,
    }
    path.write_text(json.dumps(data))
    return path


def read_voc_ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


# --- VOC ----------------------------------------------------------------------------------------


def test_voc_root_split_pairs_concatenate(shapes_tree, tmp_path):
    cfg = DatasetConfig(root=[str(shapes_tree)] * 2, split=["train", "val"], classes=SHAPES_CLASSES)
    records, classes = index_dataset(cfg, Problems("raise"))
    assert classes == SHAPES_CLASSES
    assert [r.image_id for r in records] == read_voc_ids(shapes_tree, "train") + read_voc_ids(shapes_tree, "val")
    assert len(records) == NUM_TRAIN + NUM_VAL

    other = tmp_path / "other"
    generate_shapes(other, 3, 0, size=SIZE, seed=9)
    cfg = DatasetConfig(root=[str(shapes_tree), str(other)], split="train", classes=SHAPES_CLASSES)  # one split for all
    records, _ = index_dataset(cfg, Problems("raise"))
    assert len(records) == NUM_TRAIN + 3
    assert all(Path(r.path).parent == shapes_tree / "JPEGImages" for r in records[:NUM_TRAIN])
    assert all(Path(r.path).parent == other / "JPEGImages" for r in records[NUM_TRAIN:])

    with pytest.raises(ConfigError, match=r"1 splits for 2 roots"):
        index_dataset(DatasetConfig(root=[str(shapes_tree)] * 2, split=["train"]), Problems("raise"))


def test_voc_missing_split_lists_the_available_ones(shapes_tree):
    with pytest.raises(FileNotFoundError, match=r"trainval\.txt: split file not found; available splits: train, val"):
        voc.index_voc(shapes_tree, "trainval", SHAPES_CLASSES, Problems("raise"))
    with pytest.raises(FileNotFoundError, match="VOC root folder not found"):
        voc.index_voc(shapes_tree / "nope", "train", SHAPES_CLASSES, Problems("raise"))


def test_voc_finds_images_by_id_with_any_extension(shapes_copy):
    jpegs = shapes_copy / "JPEGImages"
    ids = read_voc_ids(shapes_copy, "train")
    expected_rgb = cv2.cvtColor(cv2.imread(str(jpegs / f"{ids[2]}.jpg")), cv2.COLOR_BGR2RGB)
    (jpegs / f"{ids[1]}.jpg").rename(jpegs / f"{ids[1]}.jpeg")
    assert cv2.imwrite(str(jpegs / f"{ids[2]}.png"), cv2.imread(str(jpegs / f"{ids[2]}.jpg")))  # a real PNG
    (jpegs / f"{ids[2]}.jpg").unlink()
    for image_id in ids[:3]:  # a <filename> pointing nowhere must not matter
        xml = shapes_copy / "Annotations" / f"{image_id}.xml"
        xml.write_text(re.sub(r"<filename>.*</filename>", "<filename>IMG_9999.gif</filename>", xml.read_text()))

    records = voc.index_voc(shapes_copy, "train", SHAPES_CLASSES, Problems("raise"))
    assert [r.image_id for r in records] == ids
    assert [Path(r.path).name for r in records[:3]] == [f"{ids[0]}.jpg", f"{ids[1]}.jpeg", f"{ids[2]}.png"]
    sample = DetectionDataset(records, SHAPES_CLASSES)[2]
    np.testing.assert_array_equal(sample["image"], expected_rgb)  # PNG is lossless: the same RGB pixels
    assert DetectionDataset(records, SHAPES_CLASSES)[1]["image"].shape == (SIZE, SIZE, 3)


def test_voc_box_convention_classes_difficult_and_tag_order(tmp_path):
    # tags out of order (xmax before ymin), no <difficult> tag on the first object
    shuffled = (
        "<object><bndbox><xmax>10</xmax><ymin>1</ymin><ymax>20</ymax><xmin>1</xmin></bndbox><name>cat</name></object>"
    )
    text = voc_xml(
        [shuffled, obj_xml("dog", (31, 6, 40, 25), difficult=1), obj_xml("cat", (5, 5, 8, 9), difficult=None)]
    )
    root = make_voc(tmp_path / "voc", {"a": text})
    (rec,) = voc.index_voc(root, "train", ["dog", "cat"], Problems("raise"))
    assert (rec.image_id, rec.width, rec.height) == ("a", 64, 48)
    assert Path(rec.path) == root / "JPEGImages" / "a.jpg"
    np.testing.assert_array_equal(rec.labels, [2, 1, 2])  # 1-based positions in the custom classes
    np.testing.assert_array_equal(rec.difficult, [False, True, False])
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64
    # 1-based inclusive (1, 1, 10, 20) covers pixels 0..9 x 0..19: continuous edges (0, 0, 10, 20)
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 10, 20], [30, 5, 40, 25], [4, 4, 8, 9]])
    np.testing.assert_array_equal(rec.source_boxes, [[1, 1, 10, 20], [31, 6, 40, 25], [5, 5, 8, 9]])


def test_voc_missing_size_falls_back_to_the_image_header(tmp_path):
    text = voc_xml([obj_xml("cat", (1, 1, 66, 20))], size=None)  # xmax 66 is beyond the 64 px image
    root = make_voc(tmp_path / "voc", {"a": text}, image_size=(64, 48))
    problems = Problems("raise")
    (rec,) = voc.index_voc(root, "train", ["cat"], problems)
    assert (rec.width, rec.height) == (64, 48)
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 64, 20]])  # clipped to the header's width
    assert problems.fixed == Counter({"box crossing the image border clipped": 1})


def test_difficult_objects_stay_in_records_but_not_in_training_samples(tmp_path):
    text = voc_xml([obj_xml("cat", (1, 1, 10, 20)), obj_xml("dog", (31, 6, 40, 25), difficult=1)])
    records = voc.index_voc(make_voc(tmp_path / "voc", {"a": text}), "train", ["dog", "cat"], Problems("raise"))

    def targets(**kwargs):
        sample = DetectionDataset(records, ["dog", "cat"], **kwargs)[0]
        return sample["boxes"].tolist(), sample["labels"].tolist()

    assert targets(train=True) == ([[0, 0, 10, 20]], [2])
    assert targets(train=True, keep_difficult=True) == ([[0, 0, 10, 20], [30, 5, 40, 25]], [2, 1])
    assert targets(train=False) == ([[0, 0, 10, 20], [30, 5, 40, 25]], [2, 1])  # evaluation sees them


# --- COCO ---------------------------------------------------------------------------------------


def test_coco_index_matches_voc_index_of_the_same_images(shapes_tree):
    for split in ("train", "val"):
        from_voc = voc.index_voc(shapes_tree, split, SHAPES_CLASSES, Problems("raise"))
        from_coco, classes = index_coco(
            shapes_tree / "JPEGImages", shapes_tree / "annotations" / f"instances_{split}.json", None, Problems("raise")
        )
        assert classes == SHAPES_CLASSES  # the file's categories sorted by id
        by_name = {Path(r.path).name: r for r in from_coco}
        assert sorted(by_name) == sorted(Path(r.path).name for r in from_voc)
        assert sum(len(r.boxes) for r in from_voc) > 2 * len(from_voc)  # a real comparison, not of empty lists
        for v in from_voc:
            c = by_name[Path(v.path).name]
            assert (c.width, c.height) == (v.width, v.height) == (SIZE, SIZE)
            np.testing.assert_array_equal(c.boxes, v.boxes)
            np.testing.assert_array_equal(c.labels, v.labels)
            np.testing.assert_array_equal(c.difficult, v.difficult)
            assert c.coco_id == int(c.image_id)


def test_coco_sparse_category_ids_map_to_contiguous_labels(tmp_path):
    cats = [{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    anns = [{"image_id": 5, "category_id": cid, "bbox": [1, 2, 10, 20]} for cid in (12, 3, 7)]
    path = write_coco(tmp_path / "instances.json", [(5, "x.jpg", 64, 48)], anns, cats)
    (rec,), classes = index_coco(tmp_path / "images", path, None, Problems("raise"))
    assert classes == ["a", "b", "c"]  # sorted by category id
    np.testing.assert_array_equal(rec.labels, [3, 1, 2])
    np.testing.assert_array_equal(rec.boxes, [[1, 2, 11, 22]] * 3)  # [x, y, w, h] -> xyxy, no shift
    assert (rec.image_id, rec.coco_id, rec.width, rec.height) == ("5", 5, 64, 48)
    coco = load_coco(path)
    assert label_to_category_id(coco, classes) == {1: 3, 2: 7, 3: 12}

    (rec,), classes = index_coco(tmp_path / "images", path, ["c", "a", "b"], Problems("raise"))  # a custom order
    np.testing.assert_array_equal(rec.labels, [1, 2, 3])
    assert label_to_category_id(coco, classes) == {1: 12, 2: 3, 3: 7}
    with pytest.raises(DatasetError, match=r"instances\.json: category 'c' \(id 12\) is not in classes"):
        index_coco(tmp_path / "images", path, ["a", "b"], Problems("raise"))


def coco_json(root: Path, split: str = "train") -> tuple[Path, dict]:
    path = root / "annotations" / f"instances_{split}.json"
    return path, json.loads(path.read_text())


def test_coco_crowd_is_difficult_and_kept_out_of_training(shapes_copy):
    path, data = coco_json(shapes_copy)
    per_image = Counter(a["image_id"] for a in data["annotations"])
    image_id = min(i for i, n in per_image.items() if n >= 2)
    first = next(a for a in data["annotations"] if a["image_id"] == image_id)
    first["iscrowd"] = 1
    path.write_text(json.dumps(data))

    records, _ = index_coco(shapes_copy / "JPEGImages", path, None, Problems("raise"))
    index = [r.coco_id for r in records].index(image_id)
    rec = records[index]
    assert rec.difficult.tolist() == [True] + [False] * (per_image[image_id] - 1)
    x, y, w, h = first["bbox"]
    np.testing.assert_array_equal(rec.boxes[0], [x, y, x + w, y + h])
    train = DetectionDataset(records, SHAPES_CLASSES, train=True)[index]
    np.testing.assert_array_equal(train["boxes"], rec.boxes[1:])
    np.testing.assert_array_equal(train["labels"], rec.labels[1:])
    assert (
        len(DetectionDataset(records, SHAPES_CLASSES, train=True, keep_difficult=True)[index]["boxes"])
        == per_image[image_id]
    )
    assert len(DetectionDataset(records, SHAPES_CLASSES, train=False)[index]["boxes"]) == per_image[image_id]


def test_keep_empty_through_build_dataset(shapes_copy):
    path, data = coco_json(shapes_copy)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]  # image 1: no objects
    for a in data["annotations"]:
        a["iscrowd"] = int(a["image_id"] == 2)  # image 2: crowd only, nothing to train on
    path.write_text(json.dumps(data))
    usable = {str(a["image_id"]) for a in data["annotations"] if not a["iscrowd"]}
    assert len(usable) <= NUM_TRAIN - 2

    def ids(keep_empty: bool) -> list[str]:
        cfg = DatasetConfig(
            format="coco", images=str(shapes_copy / "JPEGImages"), annotations=str(path), keep_empty=keep_empty
        )
        ds = build_dataset(cfg, None, train=True)
        assert ds.classes == SHAPES_CLASSES
        return [r.image_id for r in ds.records]

    assert sorted(ids(False), key=int) == sorted(usable, key=int)
    assert ids(True) == [str(i) for i in range(1, NUM_TRAIN + 1)]


# --- bad files: read_image --------------------------------------------------------------------


def test_read_image_rejects_truncated_garbage_empty_and_missing_files(shapes_tree, tmp_path):
    good = shapes_tree / "JPEGImages" / "train_000000.jpg"
    assert read_image(str(good)).shape == (SIZE, SIZE, 3)
    data = good.read_bytes()
    cases = {
        "half.jpg": (data[: len(data) // 2], "truncated JPEG"),
        "garbage.jpg": (b"this is not an image\n" * 50, "not a decodable image"),
        "empty.jpg": (b"", "empty file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / name}: {message}")):
            read_image(str(tmp_path / name))
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'nope.jpg'}: cannot read")):
        read_image(str(tmp_path / "nope.jpg"))


def test_jpeg_with_data_after_its_end_marker_is_readable(shapes_tree, tmp_path):
    path = tmp_path / "appended.jpg"
    path.write_bytes((shapes_tree / "JPEGImages" / "train_000000.jpg").read_bytes() + bytes(range(256)) * 20)
    assert cv2.imread(str(path)).shape == (SIZE, SIZE, 3)  # libjpeg stops at the end marker
    assert read_image(str(path)).shape == (SIZE, SIZE, 3)


def test_header_size_fallback_agrees_with_the_decoded_image_under_exif_rotation(tmp_path):
    from PIL import Image

    root = make_voc(tmp_path / "voc", {"a": voc_xml([obj_xml("cat", (1, 1, 10, 20))], size=None)})
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new("RGB", (80, 40), (200, 30, 30)).save(root / "JPEGImages" / "a.jpg", exif=exif)
    (rec,) = voc.index_voc(root, "train", ["cat"], Problems("raise"))
    sample = DetectionDataset([rec], ["cat"])[0]  # stored frame on both sides: EXIF orientation is ignored
    assert sample["image"].shape[:2] == (rec.height, rec.width)


# --- bad files: the index, under raise and skip ------------------------------------------------

GOOD_XML = voc_xml([obj_xml("cat", (1, 1, 10, 20))])


def _broken_xml(text: str):
    return lambda root: (root / "Annotations" / "b.xml").write_text(text)


# (kind, plant the problem in image "b" of a, b, c; the file the message names; its reason; records under skip)
VOC_PROBLEMS = [
    ("missing image", lambda r: (r / "JPEGImages" / "b.jpg").unlink(), "JPEGImages/b.*", "no image for id 'b'", 2),
    (
        "missing annotation",
        lambda r: (r / "Annotations" / "b.xml").unlink(),
        "Annotations/b.xml",
        "annotation file not found",
        2,
    ),
    ("malformed annotation", _broken_xml("<annotation><object><name>cat"), "Annotations/b.xml", "malformed XML", 2),
    (
        "malformed annotation",
        _broken_xml(voc_xml([obj_xml("cat", (1, 1, "", 20))])),
        "Annotations/b.xml",
        "has no numeric <xmax>",
        2,
    ),
    (
        "unknown class",
        _broken_xml(voc_xml([obj_xml("zebra", (1, 1, 10, 20))])),
        "Annotations/b.xml",
        "object class 'zebra' is not in classes",
        3,
    ),
    (
        "non-finite box",
        _broken_xml(voc_xml([obj_xml("cat", ("nan", 1, 10, 20))])),
        "Annotations/b.xml",
        "1 box(es) with non-finite coordinates",
        3,
    ),
]


@pytest.mark.parametrize(
    "kind, plant, where, reason, num_skip",
    VOC_PROBLEMS,
    ids=["missing-image", "missing-xml", "malformed-xml", "non-numeric", "unknown-class", "non-finite"],
)
def test_voc_problem_raises_naming_the_file_or_is_counted(tmp_path, kind, plant, where, reason, num_skip):
    root = make_voc(tmp_path / "voc", dict.fromkeys("abc", GOOD_XML))
    plant(root)
    with pytest.raises(DatasetError) as info:
        voc.index_voc(root, "train", ["cat"], Problems("raise"))
    assert str(info.value).startswith(f"{root / where}: ")
    assert reason in str(info.value)

    problems = Problems("skip")
    records = voc.index_voc(root, "train", ["cat"], problems)
    assert problems.counts == Counter({kind: 1})
    assert bool(problems)
    assert len(records) == num_skip
    assert sum(len(r.boxes) for r in records) == 2  # only b's object is lost
    assert problems.summary()[0].startswith(f"1 x {kind}, e.g. {root / where}: ")


def test_raise_stops_at_the_first_problem_and_skip_counts_them_all(tmp_path):
    zebra = voc_xml([obj_xml("zebra", (1, 1, 10, 20))])
    root = make_voc(tmp_path / "voc", {"a": GOOD_XML, "b": zebra, "c": zebra, "d": GOOD_XML})
    with pytest.raises(DatasetError, match=re.escape(str(root / "Annotations" / "b.xml"))):
        voc.index_voc(root, "train", ["cat"], Problems("raise"))
    problems = Problems("skip")
    records = voc.index_voc(root, "train", ["cat"], problems)
    assert problems.counts == Counter({"unknown class": 2})
    assert [e.split(":")[0] for e in problems.examples["unknown class"]] == [
        str(root / "Annotations" / f"{i}.xml") for i in "bc"
    ]
    assert [len(r.boxes) for r in records] == [1, 0, 0, 1]


def test_box_repairs_are_applied_and_counted_but_never_raise(tmp_path):
    objects = [
        obj_xml("cat", (1, 1, 66, 20)),  # crosses the right border of the 64 px image by 2 px: clipped
        obj_xml("dog", (20, 5, 10, 30)),  # xmax < xmin: degenerate, dropped
        obj_xml("cat", (5, 30, 9, 30)),  # ymin == ymax is a one-pixel-high box in VOC: kept
        obj_xml("dog", (66, 1, 67, 10)),  # entirely right of the image, within 4 px: dropped
    ]
    root = make_voc(tmp_path / "voc", {"a": voc_xml(objects)})
    problems = Problems("raise")
    (rec,) = voc.index_voc(root, "train", ["dog", "cat"], problems)
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 64, 20], [4, 29, 9, 30]])
    np.testing.assert_array_equal(rec.source_boxes, [[1, 1, 66, 20], [5, 30, 9, 30]])  # the file's own numbers
    np.testing.assert_array_equal(rec.labels, [2, 2])
    assert problems.fixed == Counter(
        {
            "box crossing the image border clipped": 1,
            "degenerate box dropped (x2 <= x1 or y2 <= y1)": 1,
            "box outside the image dropped": 1,
        }
    )
    assert not problems  # repairs are not problems
    xml = str(root / "Annotations" / "a.xml")
    assert problems.examples["degenerate box dropped (x2 <= x1 or y2 <= y1)"] == [f"{xml}: 1 box"]
    assert f"1 x box crossing the image border clipped (repaired), e.g. {xml}: 1 box" in problems.summary()


def test_a_box_far_past_the_image_is_a_likely_wrong_label_not_a_repair(tmp_path):
    """400 px past a 550 px image is not an overshoot: clipping it would invent a box. Beyond max(4 px, 2% of
    the side) a box is a named problem (raised, or counted and dropped under skip); within it, clipped."""
    objects = [obj_xml("cat", (101, 1, 950, 60)), obj_xml("dog", (1, 1, 559, 60)), obj_xml("cat", (1, 1, 40, 40))]
    root = make_voc(tmp_path / "voc", {"a": voc_xml(objects, size=(550, 300))}, image_size=(550, 300))
    xml = root / "Annotations" / "a.xml"
    message = f"{xml}: box [100.0, 0.0, 950.0, 60.0] reaches 400 px past the 550x300 image (more than max(4 px, 2% "
    with pytest.raises(DatasetError, match=re.escape(message)):
        voc.index_voc(root, "train", ["dog", "cat"], Problems("raise"))
    problems = Problems("skip")
    (rec,) = voc.index_voc(root, "train", ["dog", "cat"], problems)
    assert problems.counts == Counter({"box far outside the image (likely wrong label)": 1})
    assert problems.fixed == Counter({"box crossing the image border clipped": 1})  # 9 px <= 2% of 550
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 550, 60], [0, 0, 40, 40]])
    np.testing.assert_array_equal(rec.labels, [1, 2])


def test_coco_problems_name_the_file(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    images = [(1, "one.jpg", 64, 48), (2, "two.jpg", 64, 48)]
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [50, 40, 16, 10]},  # crosses the border by 2 px: clipped
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width: dropped
        {"image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5]},  # unknown category
    ]
    path = write_coco(tmp_path / "instances.json", images, anns, cats)
    with pytest.raises(
        DatasetError, match=re.escape(f"{path} image id 2 (two.jpg): annotation 3 has unknown category_id 9")
    ):
        index_coco(tmp_path / "images", path, None, Problems("raise"))
    problems = Problems("skip")
    records, _ = index_coco(tmp_path / "images", path, None, problems)
    assert problems.counts == Counter({"unknown class": 1})
    assert problems.fixed == Counter(
        {"box crossing the image border clipped": 1, "degenerate box dropped (x2 <= x1 or y2 <= y1)": 1}
    )
    np.testing.assert_array_equal(records[0].boxes, [[50, 40, 64, 48]])
    assert len(records[1].boxes) == 0

    (tmp_path / "images" / "two.jpg").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'images' / 'two.jpg'}: image of id 2 not found")):
        index_coco(tmp_path / "images", path, None, Problems("raise"))

    broken = tmp_path / "broken.json"
    broken.write_text(path.read_text()[:-20])
    with pytest.raises(DatasetError, match=re.escape(f"{broken}: malformed JSON")):
        index_coco(tmp_path / "images", broken, None, Problems("skip"))  # a broken file raises under any policy
    with pytest.raises(FileNotFoundError, match="COCO annotation file not found"):
        index_coco(tmp_path / "images", tmp_path / "missing.json", None, Problems("skip"))


# --- DetectionDataset and build_dataset under the error policy ----------------------------------


def test_unreadable_image_is_skipped_by_collate_or_raises(shapes_copy):
    records = voc.index_voc(shapes_copy, "train", SHAPES_CLASSES, Problems("raise"))[:3]
    bad = Path(records[1].path)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated after indexing
    transform = build_transforms(AugmentConfig(), PreprocessConfig(), 64, train=False)

    ds = DetectionDataset(records, SHAPES_CLASSES, transform, on_error="skip")
    samples = [ds[i] for i in range(3)]
    assert samples[1] == {
        "error": f"{bad}: truncated JPEG (no end-of-image marker after the image data)",
        "image_id": records[1].image_id,
    }
    batch = collate(samples)
    assert batch["errors"] == [samples[1]["error"]]
    assert batch["image_ids"] == [records[0].image_id, records[2].image_id]
    assert batch["images"].shape == (2, 3, 64, 64) and len(batch["boxes"]) == 2

    with pytest.raises(DatasetError, match=re.escape(f"{bad}: truncated JPEG")):
        DetectionDataset(records, SHAPES_CLASSES, transform, on_error="raise")[1]


def test_image_size_disagreeing_with_the_annotation_is_an_error(shapes_tree):
    (rec,) = voc.index_voc(shapes_tree, "train", SHAPES_CLASSES, Problems("raise"))[:1]
    rec.width = 100
    message = f"{rec.path}: image is {SIZE}x{SIZE} but its annotation says 100x{SIZE}"
    assert DetectionDataset([rec], SHAPES_CLASSES, on_error="skip")[0] == {"error": message, "image_id": rec.image_id}
    with pytest.raises(DatasetError, match=re.escape(message)):
        DetectionDataset([rec], SHAPES_CLASSES)[0]


def test_build_dataset_auto_raises_on_index_problems_and_skip_drops_them(shapes_copy):
    cfg = DatasetConfig(root=str(shapes_copy), split="train", classes=SHAPES_CLASSES)
    assert build_dataset(cfg, None, train=True).on_error == "skip"  # auto: reading images skips bad ones
    assert build_dataset(cfg, None, train=True, on_error="raise").on_error == "raise"
    (shapes_copy / "JPEGImages" / "train_000003.jpg").unlink()
    with pytest.raises(
        DatasetError, match=re.escape(f"{shapes_copy / 'JPEGImages' / 'train_000003.*'}: no image for id")
    ):
        build_dataset(cfg, None, train=True)  # on_error="auto"
    ds = build_dataset(cfg, None, train=True, on_error="skip")
    assert len(ds) == NUM_TRAIN - 1 and "train_000003" not in [r.image_id for r in ds.records]
    empty = DatasetConfig(root=str(shapes_copy), split="train", classes=["hexagon"], keep_empty=False)
    with pytest.raises(DatasetError, match="data.train: the dataset has no usable images"):
        build_dataset(empty, None, train=True, on_error="skip")  # every object has an unknown class


# --- the annotation cache -----------------------------------------------------------------------


def test_cache_skips_parsing_and_never_goes_stale(shapes_copy, cache_dir, monkeypatch):
    parsed = []
    real = voc.parse_voc_xml

    def counting(path):
        parsed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(voc, "parse_voc_xml", counting)
    first = voc.index_voc(shapes_copy, "train", SHAPES_CLASSES, Problems("raise"))
    assert len(parsed) == NUM_TRAIN
    assert sorted(p.name.split("-")[0] + p.suffix for p in cache_dir.iterdir()) == ["headers.pkl", "voc.pkl"]

    parsed.clear()
    second = voc.index_voc(shapes_copy, "train", SHAPES_CLASSES, Problems("raise"))
    assert parsed == []
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)

    # edit one coordinate without changing the file size, then bump its mtime
    def editable(r) -> bool:  # xmax - 1 keeps its digit count and the box stays valid
        return len(r.boxes) > 0 and 11 <= r.source_boxes[0, 2] and r.source_boxes[0, 2] - 1 > r.source_boxes[0, 0]

    index = next(i for i, r in enumerate(first) if editable(r))
    xml = shapes_copy / "Annotations" / f"{first[index].image_id}.xml"
    old = int(first[index].source_boxes[0, 2])
    text = xml.read_text()
    edited = text.replace(f"<xmax>{old}</xmax>", f"<xmax>{old - 1}</xmax>", 1)
    assert len(edited) == len(text) and edited != text
    st = xml.stat()
    xml.write_text(edited)
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    parsed.clear()
    third = voc.index_voc(shapes_copy, "train", SHAPES_CLASSES, Problems("raise"))
    assert parsed == [xml.name]
    assert third[index].boxes[0, 2] == old - 1
    np.testing.assert_array_equal(third[index].boxes[1:], first[index].boxes[1:])

    # a corrupt cache file is ignored, not trusted
    (cache_file,) = cache_dir.glob("voc-*.pkl")
    cache_file.write_bytes(b"not a pickle")
    parsed.clear()
    fourth = voc.index_voc(shapes_copy, "train", SHAPES_CLASSES, Problems("raise"))
    assert len(parsed) == NUM_TRAIN and fourth[index].boxes[0, 2] == old - 1
