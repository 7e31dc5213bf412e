"""Training and evaluating on a subset of a dataset's classes (``ignore_other_classes``): a VOC tree and a
COCO file with classes the config does not list. Off: the error names the class, the closest listed
name and the option. On: the objects are dropped and counted (check report, build log), and evaluation
scores only the listed classes (COCO: ``catIds`` restricted, labels matched by name in another order)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssd.config import DatasetConfig
from ssd.data.check import check_split, format_report
from ssd.data.dataset import build_dataset, index_dataset
from ssd.data.records import DatasetError, Problems
from ssd.engine.evalset import EvalSet, evaluate_predictions

OPTION_HINT = (
    "; to train on the listed classes only, set ignore_other_classes: true on this dataset "
    "(e.g. data.train.ignore_other_classes=true)"
)
SKIP_HINT = ", or data.on_error=skip to skip such objects as counted problems"


def write_image(path: Path, width: int = 64, height: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))


# --- VOC ------------------------------------------------------------------------------------------------

# image id -> [(class, (xmin, ymin, xmax, ymax) 1-based inclusive)]
VOC_OBJECTS = {
    "a": [("cat", (1, 1, 20, 20)), ("bird", (30, 5, 40, 25)), ("dog", (5, 25, 30, 45))],
    "b": [("bird", (2, 2, 12, 12))],
    "c": [("dog", (10, 10, 50, 40)), ("horse", (1, 1, 64, 48)), ("bird", (20, 20, 30, 30))],
}


def make_voc(root: Path, objects: dict = VOC_OBJECTS) -> Path:
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for image_id, objs in objects.items():
        write_image(root / "JPEGImages" / f"{image_id}.jpg")
        xml = "".join(
            f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
            f"<ymax>{b[3]}</ymax></bndbox></object>"
            for name, b in objs
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>64</width><height>48</height></size>{xml}</annotation>"
        )
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in objects))
    return root


def voc_cfg(root: Path, **kwargs) -> DatasetConfig:
    return DatasetConfig(format="voc", root=str(root), split="train", classes=["dog", "cat"], **kwargs)


def test_voc_unlisted_class_error_names_the_class_the_closest_name_and_both_options(tmp_path):
    root = make_voc(tmp_path / "voc")
    with pytest.raises(DatasetError) as info:
        index_dataset(voc_cfg(root), Problems("raise"))
    xml = root / "Annotations" / "a.xml"
    assert str(info.value) == f"{xml}: object class 'bird' is not in classes ['dog', 'cat']{OPTION_HINT}{SKIP_HINT}"

    typo = make_voc(tmp_path / "typo", {"a": [("cats", (1, 1, 20, 20))]})
    with pytest.raises(DatasetError) as info:
        index_dataset(voc_cfg(typo), Problems("raise"))
    assert str(info.value) == (
        f"{typo / 'Annotations' / 'a.xml'}: object class 'cats' is not in classes ['dog', 'cat'] "
        f"(did you mean 'cat'?){OPTION_HINT}{SKIP_HINT}"
    )


def test_voc_ignore_other_classes_drops_and_counts_per_class(tmp_path, caplog):
    root = make_voc(tmp_path / "voc")
    problems = Problems("raise")
    a, b, c = index_dataset(voc_cfg(root, ignore_other_classes=True), problems)[0]
    assert [r.labels.tolist() for r in (a, b, c)] == [[2, 1], [], [1]]
    np.testing.assert_array_equal(a.boxes, [[0, 0, 20, 20], [4, 24, 30, 45]])
    assert problems.fixed == Counter(
        {
            "object of unlisted class 'bird' dropped (ignore_other_classes)": 3,
            "object of unlisted class 'horse' dropped (ignore_other_classes)": 1,
        }
    )
    assert not problems

    with caplog.at_level(logging.WARNING, logger="ssd"):  # the build log counts them
        dataset = build_dataset(voc_cfg(root, ignore_other_classes=True), None, train=True, key="data.train")
    assert len(dataset) == 3  # b keeps its image, without objects (keep_empty)
    assert "data.train: 3 x object of unlisted class 'bird' dropped (ignore_other_classes) (repaired)" in caplog.text
    assert "data.train: 1 x object of unlisted class 'horse' dropped (ignore_other_classes) (repaired)" in caplog.text

    report, _, _ = check_split(voc_cfg(root, ignore_other_classes=True), "data.train")  # ssd data check
    assert report.ok and report.objects == Counter({"dog": 2, "cat": 1}) and report.empty_images == 1
    text = format_report(report)
    assert text.startswith("data.train: 3 images, 3 objects")
    assert "    3 x object of unlisted class 'bird' dropped (ignore_other_classes) (repaired), e.g. " in text


def test_voc_evaluation_scores_only_the_listed_classes(tmp_path):
    dataset = build_dataset(
        voc_cfg(make_voc(tmp_path / "voc"), ignore_other_classes=True), None, train=False, key="data.val"
    )
    predictions = {
        r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels} for r in dataset.records
    }
    for metric in ("voc07", "coco"):
        result = evaluate_predictions(dataset, predictions, metric)
        assert result["per_class"] == pytest.approx({"dog": 1.0, "cat": 1.0}), metric
        assert result["num_gt"] == {"dog": 2, "cat": 1} and result["map"] == pytest.approx(1.0)


# --- COCO -----------------------------------------------------------------------------------------------

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]
# (image id, category id, [x, y, w, h])
COCO_OBJECTS = [
    (1, 1, [2, 2, 20, 30]),
    (1, 3, [30, 10, 25, 15]),
    (1, 7, [10, 20, 30, 25]),
    (2, 3, [5, 5, 40, 30]),
    (2, 3, [40, 20, 20, 20]),
    (2, 1, [1, 1, 10, 40]),
]


@pytest.fixture
def coco_file(tmp_path) -> Path:
    for image_id in (1, 2):
        write_image(tmp_path / "images" / f"{image_id}.jpg")
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2)],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(COCO_OBJECTS, 1)
        ],
        "categories": CATEGORIES,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def coco_cfg(path: Path, classes: list[str], **kwargs) -> DatasetConfig:
    return DatasetConfig(
        format="coco", images=str(path.parent / "images"), annotations=str(path), classes=classes, **kwargs
    )


def test_coco_unlisted_category_error_names_it_and_the_option(coco_file):
    with pytest.raises(DatasetError) as info:
        index_dataset(coco_cfg(coco_file, ["dog", "person"]), Problems("skip"))  # raises under any policy
    assert str(info.value) == f"{coco_file}: category 'car' (id 3) is not in classes ['dog', 'person']{OPTION_HINT}"
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "category 'car' (id 3) is not in classes ['dog', 'person', 'cars'] "
            "(did you mean 'cars'?); to train on the listed classes only"
        ),
    ):
        index_dataset(coco_cfg(coco_file, ["dog", "person", "cars"]), Problems("raise"))


def test_coco_subset_in_another_order_maps_by_name_and_scores_only_the_listed_categories(coco_file):
    problems = Problems("raise")
    (one, two), classes = index_dataset(coco_cfg(coco_file, ["dog", "person"], ignore_other_classes=True), problems)
    assert classes == ["dog", "person"]
    assert one.labels.tolist() == [2, 1] and two.labels.tolist() == [2]  # person -> 2, dog -> 1 (by name)
    np.testing.assert_array_equal(one.boxes, [[2, 2, 22, 32], [10, 20, 40, 45]])
    assert problems.fixed == Counter({"object of unlisted class 'car' dropped (ignore_other_classes)": 3})

    dataset = build_dataset(
        coco_cfg(coco_file, ["dog", "person"], ignore_other_classes=True), None, train=False, key="data.val"
    )
    evalset = EvalSet(dataset, coco_file)
    assert evalset.category_of_label == {1: 7, 2: 1}
    predictions = {
        r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels} for r in dataset.records
    }
    detections = evalset.from_predictions(predictions)
    assert sorted(r["category_id"] for r in evalset.results(detections)) == [1, 1, 7]
    result = evalset.evaluate(detections, "coco")
    # the file's 3 car objects have no detector here; scored, they would be AP 0 and pull AP to 2/3
    assert result["AP"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert result["per_class"] == pytest.approx({"dog": 1.0, "person": 1.0})
    assert result["num_gt"] == {"dog": 1, "person": 2}
    assert evaluate_predictions(dataset, predictions, "voc07", annotations=coco_file)["per_class"] == pytest.approx(
        {"dog": 1.0, "person": 1.0}
    )
