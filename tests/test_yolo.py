"""ssd.data.yolo on YOLO trees generated on disk: both folder arrangements, list files and data.yaml
splits, class names from the config / data.yaml (list and map) / classes.txt, exact pixel boxes,
the raise / skip policy naming file and line, ``ssd data check``, evaluation and a 2-iteration training."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from ssd.cli import main
from ssd.config import Config, DatasetConfig, from_dict
from ssd.data import voc
from ssd.data.dataset import build_dataset, collate, index_dataset
from ssd.data.records import DatasetError, Problems
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.data.transforms import build_transforms
from ssd.data.yolo import index_yolo, label_path
from ssd.engine.evalset import evaluate_predictions
from ssd.engine.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes_tiny.yaml"
SHAPES_SIZE, NUM_TRAIN, NUM_VAL = 64, 8, 4


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 120, np.uint8))
    return path


def make_yolo(
    root: Path,
    files: dict[str, str | None],
    split: str = "train",
    arrangement: str = "images/split",
    size: tuple[int, int] = (100, 50),
) -> Path:
    """One ``size`` (w, h) JPEG per name with the given label text (None: no label file)."""
    images, labels = (
        (root / "images" / split, root / "labels" / split)
        if arrangement == "images/split"
        else (root / split / "images", root / split / "labels")
    )
    for name, text in files.items():
        write_image(images / f"{name}.jpg", *size)
        if text is not None:
            labels.mkdir(parents=True, exist_ok=True)
            (labels / f"{name}.txt").write_text(text)
    return root


def yolo_cfg(root: Path, split: str = "train", **kwargs) -> DatasetConfig:
    return DatasetConfig(format="yolo", root=str(root), split=split, **kwargs)


# --- layouts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arrangement", ["images/split", "split/images"])
def test_both_arrangements_give_exact_pixel_boxes(tmp_path, arrangement):
    files = {"a": "0 0.5 0.5 0.16 0.48\n1 0.08 0.24 0.16 0.48\n", "b": None, "c": ""}
    root = make_yolo(tmp_path / "yolo", files, arrangement=arrangement)
    problems = Problems("raise")
    a, b, c = index_yolo(root, "train", ["cat", "dog"], problems)
    folder = "images/train" if arrangement == "images/split" else "train/images"
    assert [r.image_id for r in (a, b, c)] == [f"{folder}/{n}" for n in "abc"]
    assert (a.width, a.height, a.path) == (100, 50, str(root / folder / "a.jpg"))
    # cx 0.5 * 100 = 50, w 16 -> 42..58; cy 0.5 * 50 = 25, h 24 -> 13..37
    np.testing.assert_allclose(a.boxes, [[42, 13, 58, 37], [0, 0, 16, 24]], atol=1e-4)
    np.testing.assert_allclose(a.source_boxes, [[43, 14, 58, 37], [1, 1, 16, 24]], atol=1e-4)  # VOC's numbers
    np.testing.assert_array_equal(a.labels, [1, 2])
    assert a.difficult.tolist() == [False, False] and a.boxes.dtype == np.float32
    assert len(b.boxes) == len(c.boxes) == 0  # no label file / an empty one: no objects
    assert not problems and not problems.fixed


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/train/x.jpg")) == Path("/d/labels/train/x.txt")
    assert label_path(Path("/d/train/images/x.png")) == Path("/d/train/labels/x.txt")
    assert label_path(Path("/images/d/images/x.jpg")) == Path("/images/d/labels/x.txt")
    assert label_path(Path("/d/pics/x.jpeg")) == Path("/d/pics/x.txt")  # no images folder: beside the image


def test_list_file_and_data_yaml_splits(tmp_path):
    root = make_yolo(
        tmp_path / "yolo", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n", "c": None}, split="all"
    )
    outside = write_image(tmp_path / "elsewhere" / "images" / "z.jpg", 100, 50)
    (tmp_path / "elsewhere" / "labels").mkdir()
    (tmp_path / "elsewhere" / "labels" / "z.txt").write_text("1 0.5 0.5 0.4 0.4\n")
    (root / "train.txt").write_text(f"./images/all/b.jpg\n\nimages/all/a.jpg\n{outside}\n")
    (root / "data.yaml").write_text(
        yaml.safe_dump(
            {"path": "/nowhere", "train": "train.txt", "val": ["images/all"], "nc": 2, "names": ["cat", "dog"]}
        )
    )
    records, classes = index_dataset(yolo_cfg(root, "train"), Problems("raise"))
    assert classes == ["cat", "dog"]
    assert [r.image_id for r in records] == [
        "images/all/b",
        "images/all/a",
        (tmp_path / "elsewhere/images/z").as_posix(),
    ]
    assert [r.labels.tolist() for r in records] == [[2], [1], [2]]  # the list file's order
    records, _ = index_dataset(yolo_cfg(root, "val"), Problems("raise"))  # a data.yaml list of folders
    assert [r.image_id for r in records] == ["images/all/a", "images/all/b", "images/all/c"]

    # a list file named by the split, without data.yaml; Roboflow's "../train/images" next to train/
    (root / "data.yaml").unlink()
    (root / "mine.txt").write_text("images/all/c.jpg\n")
    records, _ = index_dataset(yolo_cfg(root, "mine", classes=["cat", "dog"]), Problems("raise"))
    assert [r.image_id for r in records] == ["images/all/c"]
    robo = make_yolo(tmp_path / "robo", {"a": "0 0.5 0.5 0.2 0.2\n"}, split="train", arrangement="split/images")
    (robo / "data.yaml").write_text("train: ../train/images\nnames: {0: cat}\n")
    (rec,), classes = index_dataset(yolo_cfg(robo, "train"), Problems("raise"))
    assert (rec.image_id, classes) == ("train/images/a", ["cat"])


def test_unknown_split_lists_what_was_tried_and_what_exists(tmp_path):
    root = make_yolo(tmp_path / "yolo", {"a": None}, split="train")
    make_yolo(root, {"b": None}, split="valid", arrangement="split/images")
    message = (
        f"{root}: YOLO split 'val' not found (looked for images/val/, val/images/, val.txt); available: train, valid"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        index_yolo(root, "val", ["cat"], Problems("raise"))
    with pytest.raises(FileNotFoundError, match="YOLO root folder not found"):
        index_yolo(tmp_path / "nope", "train", ["cat"], Problems("raise"))


# --- class names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", ["yaml list", "yaml map", "classes.txt", "config"])
def test_class_names_sources(tmp_path, declared, caplog):
    root = make_yolo(tmp_path / "yolo", {"a": "1 0.5 0.5 0.2 0.2\n"})
    if declared == "yaml list":
        (root / "data.yaml").write_text("names: [cat, dog]\n")
    elif declared == "yaml map":
        (root / "data.yaml").write_text("names:\n  1: dog\n  0: cat\n")
    elif declared == "classes.txt":
        (root / "classes.txt").write_text("cat\ndog\n\n")
    else:
        (root / "data.yaml").write_text("names: [x, y]\n")  # the config's classes win
    cfg = yolo_cfg(root, classes=["cat", "dog"] if declared == "config" else None)
    with caplog.at_level(logging.WARNING, logger="ssd"):
        (rec,), classes = index_dataset(cfg, Problems("raise"))
    assert classes == ["cat", "dog"] and rec.labels.tolist() == [2]
    warned = (
        f"{root}: the config's classes ['cat', 'dog'] differ from the names the dataset declares ['x', 'y']"
        in caplog.text
    )
    assert warned == (declared == "config")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no class names: set classes in the dataset config, or put data.yaml (names) or classes.txt"),
        ({"data.yaml": "names: {0: a, 2: c}\n"}, "data.yaml: names: ids must be 0..1 without gaps; missing [1]"),
        ({"data.yaml": "nc: 3\nnames: [a, b]\n"}, "data.yaml: nc is 3 but names has 2 entries"),
        ({"data.yaml": "names: [a\n"}, "data.yaml: malformed YAML"),
        ({"classes.txt": "a\n\nb\n"}, "classes.txt:2: empty class name"),
    ],
)
def test_bad_class_declarations_name_the_file(tmp_path, files, message):
    root = make_yolo(tmp_path / "yolo", {"a": None})
    for name, text in files.items():
        (root / name).write_text(text)
    with pytest.raises(DatasetError, match=re.escape(message)):
        index_dataset(yolo_cfg(root), Problems("skip"))  # a broken declaration raises under any policy


# --- the error policy ------------------------------------------------------------------------------


GOOD = "0 0.5 0.5 0.2 0.2"
# (line planted as line 2 of a.txt; kind; the reason in the message)
LINE_PROBLEMS = [
    (
        "0 1.2 0.5 0.2 0.2",
        "box outside the image",
        "box (cx, cy, w, h) = (1.2, 0.5, 0.2, 0.2) reaches (1.1, 0.4, 1.3, 0.6) "
        "(x1, y1, x2, y2), more than 0.01 outside [0, 1]",
    ),
    (
        "0 0.5 0.5 0.2",
        "malformed label line",
        "4 values in '0 0.5 0.5 0.2'; expected 5: class cx cy w h (normalised to [0, 1])",
    ),
    ("cat 0.5 0.5 0.2 0.2", "malformed label line", "'cat 0.5 0.5 0.2 0.2' is not numbers; expected 'class cx cy w h'"),
    ("1.5 0.5 0.5 0.2 0.2", "malformed label line", "class id '1.5' is not an integer"),
    ("2 0.5 0.5 0.2 0.2", "class id out of range", "class id 2 is not in 0..1 (2 classes: cat, dog)"),
    ("-1 0.5 0.5 0.2 0.2", "class id out of range", "class id -1 is not in 0..1 (2 classes: cat, dog)"),
]


@pytest.mark.parametrize(
    ("line", "kind", "reason"), LINE_PROBLEMS, ids=["outside", "four-values", "word", "float-id", "id-2", "id-minus-1"]
)
def test_line_problem_raises_naming_file_and_line_or_is_counted(tmp_path, line, kind, reason):
    root = make_yolo(tmp_path / "yolo", {"a": f"{GOOD}\n{line}\n{GOOD}\n"})
    where = root / "labels" / "train" / "a.txt"
    with pytest.raises(DatasetError) as info:
        index_yolo(root, "train", ["cat", "dog"], Problems("raise"))
    assert str(info.value) == f"{where}:2: {reason}"
    problems = Problems("skip")
    (rec,) = index_yolo(root, "train", ["cat", "dog"], problems)
    assert problems.counts == Counter({kind: 1}) and not problems.fixed
    assert len(rec.boxes) == 2  # only the planted line is lost


def test_non_finite_coordinates_are_a_problem(tmp_path):
    root = make_yolo(tmp_path / "yolo", {"a": f"{GOOD}\n0 nan 0.5 0.2 0.2\n"})
    with pytest.raises(
        DatasetError, match=re.escape(f"{root / 'labels/train/a.txt'}: 1 box(es) with non-finite coordinates")
    ):
        index_yolo(root, "train", ["cat"], Problems("raise"))
    problems = Problems("skip")
    (rec,) = index_yolo(root, "train", ["cat"], problems)
    assert problems.counts == Counter({"non-finite box": 1}) and len(rec.boxes) == 1


def test_repairs_clip_within_the_tolerance_and_turn_polygons_into_boxes_without_raising(tmp_path):
    lines = [
        GOOD,
        "1 0.995 0.5 0.02 0.2",  # x2 = 1.005: within the 1% tolerance, clipped to the border
        "0 0.1 0.1 0.3 0.15 0.25 0.3 0.12 0.28",  # a polygon: the bounding box of its 4 points
        "0 0.5 0.5 0 0.2",  # zero width: degenerate, dropped
        "0 0.009 0.5 0.02 0.2",  # x1 = -0.001: clipped
    ]
    root = make_yolo(tmp_path / "yolo", {"a": "\n".join(lines) + "\n"})
    problems = Problems("raise")
    (rec,) = index_yolo(root, "train", ["cat", "dog"], problems)
    where = root / "labels" / "train" / "a.txt"
    np.testing.assert_allclose(
        rec.boxes, [[40, 20, 60, 30], [98.5, 20, 100, 30], [10, 5, 30, 15], [0, 20, 1.9, 30]], atol=1e-4
    )
    assert rec.labels.tolist() == [1, 2, 1, 1]
    assert problems.fixed == Counter(
        {
            "box crossing the image border clipped": 2,
            "polygon converted to box": 1,
            "degenerate box dropped (x2 <= x1 or y2 <= y1)": 1,
        }
    )
    assert problems.examples["polygon converted to box"][0].startswith(f"{where}:3")  # file and line
    assert not problems


def test_ignore_other_classes_drops_ids_beyond_the_list_and_counts_them(tmp_path):
    root = make_yolo(tmp_path / "yolo", {"a": f"{GOOD}\n2 0.5 0.5 0.2 0.2\n2 0.4 0.4 0.2 0.2\n1 0.5 0.5 0.2 0.2\n"})
    problems = Problems("raise")
    (rec,), _ = index_dataset(yolo_cfg(root, classes=["cat", "dog"], ignore_other_classes=True), problems)
    assert rec.labels.tolist() == [1, 2]
    assert problems.fixed == Counter({"object of unlisted class id 2 dropped (ignore_other_classes)": 2})


def test_missing_unreadable_and_duplicate_images(tmp_path):
    root = make_yolo(tmp_path / "yolo", {"a": GOOD, "b": GOOD})
    write_image(root / "images" / "train" / "a.png", 100, 50)  # a.jpg and a.png share labels/train/a.txt
    (root / "images" / "train" / "c.jpg").write_bytes(b"not an image")
    (root / "list.txt").write_text("images/train/b.jpg\nimages/train/gone.jpg\n")
    problems = Problems("skip")
    records = index_yolo(root, "train", ["cat"], problems)
    assert [r.image_id for r in records] == ["images/train/a", "images/train/b"]
    assert problems.counts == Counter({"duplicate image": 1, "unreadable image": 1})
    assert problems.examples["duplicate image"] == [
        f"{root}/images/train/a.png: shares its label file {root}/labels/train/a.txt with {root}/images/train/a.jpg"
    ]
    problems = Problems("skip")
    assert len(index_yolo(root, "list", ["cat"], problems)) == 1
    assert problems.examples["missing image"] == [
        f"{root}/images/train/gone.jpg: image file not found (split 'list' of {root})"
    ]


# --- the whole path: data check, evaluation, training --------------------------------------------------


@pytest.fixture(scope="module")
def shapes_yolo(tmp_path_factory) -> tuple[Path, Path]:
    """The shapes dataset as a VOC tree and the same images as a YOLO tree (images/<split>, labels/<split>)."""
    voc_root = tmp_path_factory.mktemp("shapes")
    generate_shapes(voc_root, NUM_TRAIN, NUM_VAL, size=SHAPES_SIZE, seed=3)
    yolo_root = tmp_path_factory.mktemp("yolo")
    for split in ("train", "val"):
        for rec in voc.index_voc(voc_root, split, SHAPES_CLASSES, Problems("raise"), use_cache=False):
            image = yolo_root / "images" / split / Path(rec.path).name
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(Path(rec.path).read_bytes())
            size = np.array([rec.width, rec.height] * 2)
            rows = [
                (label - 1, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1])
                for label, b in zip(rec.labels.tolist(), (rec.boxes / size).tolist(), strict=True)
            ]
            text = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows)
            label = yolo_root / "labels" / split / f"{Path(rec.path).stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    (yolo_root / "data.yaml").write_text(yaml.safe_dump({"names": dict(enumerate(SHAPES_CLASSES))}))
    return voc_root, yolo_root


def test_yolo_index_of_a_converted_voc_tree_matches_the_voc_index(shapes_yolo):
    voc_root, yolo_root = shapes_yolo
    for split in ("train", "val"):
        from_voc = voc.index_voc(voc_root, split, SHAPES_CLASSES, Problems("raise"))
        from_yolo, classes = index_dataset(yolo_cfg(yolo_root, split), Problems("raise"))
        assert classes == SHAPES_CLASSES
        assert [Path(r.path).name for r in from_yolo] == [Path(r.path).name for r in from_voc]
        assert sum(len(r.boxes) for r in from_voc) >= len(from_voc) > 0  # a real comparison, not of empty lists
        for y, v in zip(from_yolo, from_voc, strict=True):
            np.testing.assert_allclose(y.boxes, v.boxes, atol=1e-3)  # 6 decimals of 64 px
            np.testing.assert_array_equal(y.labels, v.labels)


def test_perfect_predictions_score_1_on_yolo_data(shapes_yolo):
    dataset = build_dataset(yolo_cfg(shapes_yolo[1], "val"), None, train=False, key="data.val")
    predictions = {
        r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels} for r in dataset.records
    }
    for metric in ("voc07", "coco"):
        result = evaluate_predictions(dataset, predictions, metric)
        assert result["map"] == pytest.approx(1.0), metric


def test_val_subset_of_a_yolo_split_keeps_the_first_images_and_their_ids(shapes_yolo, tmp_path):
    from ssd.studies.bn_study import val_subset

    cfg = yolo_cfg(shapes_yolo[1], "val")
    full = build_dataset(cfg, None, train=False, key="data.val").records
    sub = build_dataset(val_subset(cfg, 3, tmp_path / "subset"), None, train=False, key="data.val").records
    assert [r.image_id for r in sub] == [r.image_id for r in full[:3]] == [f"images/val/val_00000{i}" for i in range(3)]
    for a, b in zip(sub, full[:3], strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)


def test_cli_data_check_on_a_yolo_tree(shapes_yolo, capsys):
    voc_root, yolo_root = shapes_yolo
    args = [
        "data",
        "check",
        str(CONFIG),
        "data.train.format=yolo",
        f"data.train.root={yolo_root}",
        "data.val.format=yolo",
        f"data.val.root={yolo_root}",
        "--no-images",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    n_train = sum(len(r.boxes) for r in voc.index_voc(voc_root, "train", SHAPES_CLASSES, Problems("raise")))
    assert f"data.train: {NUM_TRAIN} images, {n_train} objects (0 difficult/crowd)" in out
    assert out.count("no problems found") == 2

    label = yolo_root / "labels" / "val" / "extra.txt"
    write_image(yolo_root / "images" / "val" / "extra.jpg", SHAPES_SIZE, SHAPES_SIZE)
    label.write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n")
    try:
        assert main([*args, "--split", "val"]) == 1
    finally:
        label.unlink()
        (yolo_root / "images" / "val" / "extra.jpg").unlink()
    out = capsys.readouterr().out
    assert f"data.val: {NUM_VAL + 1} images" in out
    assert (
        f"1 x class id out of range, e.g. {label}:2: class id 7 is not in 0..3 "
        "(4 classes: circle, square, triangle, star)" in out
    )
    assert "1 x polygon converted to box (repaired)" in out


def test_two_iterations_train_and_evaluate_on_yolo_data(shapes_yolo, tmp_path):
    yolo_root = str(shapes_yolo[1])
    cfg = from_dict(
        Config,
        {
            "model": {
                "num_classes": 5,
                "input_size": 64,
                "width": 0.125,
                "dropout": 0.0,
                "extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}],
            },
            "data": {
                "train": {"format": "yolo", "root": yolo_root, "split": "train"},
                "val": {"format": "yolo", "root": yolo_root, "split": "val"},
                "num_workers": 0,
            },
            "train": {
                "max_iter": 2,
                "batch_size": 4,
                "device": "cpu",
                "eval_period": 2,
                "log_period": 1,
                "warmup_iters": 1,
                "checkpoint_period": 2,
                "tensorboard": False,
            },
            "eval": {"batch_size": 4},
        },
    )
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size, train=True)
    dataset = build_dataset(cfg.data.train, transform, train=True, key="data.train")
    batch = collate([dataset[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 64, 64) and batch["labels"].max() <= 4
    summary = train(cfg, tmp_path / "run")
    assert summary["iteration"] == 2
    assert 0.0 <= summary["best_map"] <= 1.0
