"""A model's classes matched to data.val's by name: a converted torchvision COCO model (90 names with
``N/A`` gaps) on COCO-format files holding a subset of the categories, with ids of their own."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from ssd.checkpoint import make_checkpoint, save_checkpoint
from ssd.classes import COCO_CATEGORY_IDS, COCO_CLASSES, coco_91_names, match_classes
from ssd.cli import main
from ssd.config import DatasetConfig, from_dict
from ssd.data.dataset import build_dataset
from ssd.engine.evalset import EvalSet, evaluate_predictions
from ssd.model import build_ssd

# the ground truth, (image id, category name, [x, y, w, h]); torchvision's label of a name is its COCO id
OBJECTS = [
    (1, "person", [10, 10, 30, 40]),
    (1, "car", [50, 20, 30, 20]),
    (2, "dog", [5, 5, 40, 40]),
    (2, "toothbrush", [60, 50, 10, 20]),
    (3, "train", [0, 0, 90, 60]),
]
TV_LABEL = {"person": 1, "car": 3, "train": 7, "N/A": 12, "cat": 17, "dog": 18, "toothbrush": 90}
# COCO's own ids; and a file with other ids, names in other case / with spaces, out of order, plus a
# category no COCO model knows (it has one object, which the model cannot find: AP 0)
COCO_IDS = {"person": 1, "car": 3, "train": 7, "dog": 18, "toothbrush": 90}
OWN_IDS = {" Dog": 5, "PERSON": 2, "car ": 40, "Train": 41, "toothbrush": 42, "unicorn": 43}


def write_coco(root: Path, name: str, categories: dict[str, int]) -> Path:
    """A COCO instances file over three 100x80 images (written to ``root``); ``categories`` name -> id."""
    cat_id = {key.strip().lower(): cid for key, cid in categories.items()}
    objects = OBJECTS + ([(3, "unicorn", [70, 60, 20, 15])] if "unicorn" in cat_id else [])
    for image_id in (1, 2, 3):
        if not (root / f"{image_id}.png").exists():
            cv2.imwrite(str(root / f"{image_id}.png"), np.full((80, 100, 3), 40 * image_id, np.uint8))
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in (1, 2, 3)],
        "annotations": [
            {"id": n, "image_id": i, "category_id": cat_id[c], "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(objects, 1)
        ],
        "categories": [{"id": cid, "name": key} for key, cid in categories.items()],
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco_names")
    return {"coco_ids": write_coco(root, "coco_ids", COCO_IDS), "own_ids": write_coco(root, "own_ids", OWN_IDS)}


def val_config(path: Path) -> dict:
    return {"format": "coco", "images": str(path.parent), "annotations": str(path)}


def box(xywh: list[float]) -> list[float]:
    return [xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]]


def test_torchvision_labels_match_the_80_coco_categories_by_name():
    mapping, how = match_classes(coco_91_names(), COCO_CLASSES)
    assert how == "name"
    assert mapping == {cid: label for label, cid in enumerate(COCO_CATEGORY_IDS, 1)}  # the 10 N/A labels map nowhere


@pytest.mark.parametrize(
    ("model", "data", "expected", "how"),
    [
        (["a", "b", "c"], ["a", "b", "c"], {1: 1, 2: 2, 3: 3}, "position"),
        (["a", "b", "c"], ["x", "b", "y"], {1: 1, 2: 2, 3: 3}, "position"),  # renamed in place: today's behaviour
        (["a", "b", "c"], ["x", "y", "z"], {1: 1, 2: 2, 3: 3}, "position"),  # nothing in common, same length
        (["a", "b", "c"], ["c", "a", "b"], {1: 2, 2: 3, 3: 1}, "name"),  # same names, other order
        (["a", "b", "c"], [" B", "x", "a ", "y"], {1: 3, 2: 1}, "name"),  # case and surrounding whitespace ignored
        (["N/A", "a", "N/A", "b"], ["b", "a"], {2: 2, 4: 1}, "name"),  # a repeated name that is not in the data is fine
    ],
)
def test_match_classes(model, data, expected, how):
    assert match_classes(model, data) == (expected, how)


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (["a", "b", "c"], ["x", "y"], "no class name is in both lists"),
        (["a", "a", "b"], ["a", "b"], "'a' appear twice in the model classes"),
        (["a", "b", "c"], ["B", "b"], "'b' appear twice in the data classes"),
    ],
)
def test_match_classes_refuses_what_it_cannot_match(model, data, message):
    with pytest.raises(ValueError, match=message):
        match_classes(model, data)


@pytest.mark.parametrize("file", ["coco_ids", "own_ids"])
def test_torchvision_labels_are_scored_against_the_category_of_the_same_name(files, file, caplog):
    """Exact boxes with torchvision labels; a higher-scored false 'person' on image 2 (person AP 0.5);
    an N/A and a 'cat' detection (not in the file) are left out; 'unicorn' has no detector (AP 0)."""
    path = files[file]
    dataset = build_dataset(from_dict(DatasetConfig, val_config(path), "data.val"), None, train=False, key="data.val")
    predictions = {str(i): {"boxes": [], "scores": [], "labels": []} for i in (1, 2, 3)}
    for image_id, name, xywh in OBJECTS:
        for key, value in (("boxes", box(xywh)), ("scores", 0.9), ("labels", TV_LABEL[name])):
            predictions[str(image_id)][key].append(value)
    extra = [(2, "person", 0.95, [60, 5, 20, 30]), (1, "N/A", 0.99, OBJECTS[0][2]), (2, "cat", 0.99, OBJECTS[2][2])]
    for image_id, name, score, xywh in extra:
        for key, value in (("boxes", box(xywh)), ("scores", score), ("labels", TV_LABEL[name])):
            predictions[str(image_id)][key].append(value)
    predictions = {
        k: {"boxes": np.array(v["boxes"]), "scores": np.array(v["scores"]), "labels": np.array(v["labels"])}
        for k, v in predictions.items()
    }

    categories = COCO_IDS if file == "coco_ids" else OWN_IDS
    with caplog.at_level(logging.INFO, logger="ssd"):
        res = evaluate_predictions(dataset, predictions, "coco", annotations=path, model_classes=coco_91_names())
    ap = {"person": 0.5, "unicorn": 0.0}  # the rest 1.0
    expected = {name: ap.get(name.strip().lower(), 1.0) for name in categories}
    assert res["per_class"] == pytest.approx(expected)
    assert res["map"] == pytest.approx(sum(expected.values()) / len(expected))
    assert (
        "2 detection(s) of model labels without a class in data.val were left out (label: count {12: 1, 17: 1})"
        in caplog.text
    )
    assert ("not detected by the model (AP 0): unicorn" in caplog.text) == (file == "own_ids")

    evalset = EvalSet(dataset, path)
    results = evalset.results(evalset.from_predictions(predictions, coco_91_names()))
    cat_of_box = {(r["image_id"], tuple(r["bbox"])): r["category_id"] for r in results if r["score"] == 0.9}
    by_name = {key.strip().lower(): cid for key, cid in categories.items()}
    # person -> 1 / 2, dog -> 18 / 5, ...
    assert cat_of_box == {(i, tuple(map(float, b))): by_name[name] for i, name, b in OBJECTS}
    assert sorted(r["category_id"] for r in results if r["score"] != 0.9) == [by_name["person"]]  # N/A and cat left out


def test_ssd_eval_runs_a_torchvision_label_space_checkpoint_on_a_subset_file(files, tmp_path, make_tiny_config, caplog):
    """A 91-class checkpoint whose scores favour N/A, cat, person and dog everywhere: ``ssd eval`` runs,
    reports the file's categories and writes only person and dog detections, under the file's ids."""
    model_cfg = make_tiny_config(num_classes=91)
    torch.manual_seed(0)
    model = build_ssd(model_cfg)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith("head."):
                p.zero_()  # boxes = the priors, the same scores at every prior
            if key.startswith("head.conf.") and key.endswith("bias"):
                p.view(-1, 91)[:, [TV_LABEL["N/A"], TV_LABEL["cat"], TV_LABEL["person"], TV_LABEL["dog"]]] = 3.0
    save_checkpoint(make_checkpoint(model.state_dict(), model_cfg, coco_91_names(), "torchvision"), tmp_path / "tv.pt")
    path = files["own_ids"]
    # every class's detections, whatever the ties
    cfg = {
        "data": {"train": val_config(path), "val": val_config(path), "num_workers": 0},
        "postprocess": {"detections_per_image": 2000},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    with caplog.at_level(logging.INFO, logger="ssd"):
        assert (
            main(
                [
                    "eval",
                    str(tmp_path / "cfg.yaml"),
                    "--weights",
                    str(tmp_path / "tv.pt"),
                    "--device",
                    "cpu",
                    "--json",
                    str(tmp_path / "m.json"),
                    "--out-dir",
                    str(tmp_path / "out"),
                ]
            )
            == 0
        )
    metrics = json.loads((tmp_path / "m.json").read_text())
    # the file's, by id
    assert list(metrics["per_class"]) == ["PERSON", " Dog", "car ", "Train", "toothbrush", "unicorn"]
    assert metrics["num_gt"] == {"PERSON": 1, " Dog": 1, "car ": 1, "Train": 1, "toothbrush": 1, "unicorn": 1}
    assert metrics["per_class"]["unicorn"] == 0.0 and metrics["per_class"]["car "] == 0.0
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {d["category_id"] for d in detections} == {OWN_IDS["PERSON"], OWN_IDS[" Dog"]}
    assert "of model labels without a class in data.val were left out" in caplog.text
