"""``ssd eval`` and ssd.engine.evaluate on real files: a tiny checkpoint over a shapes val set in VOC
and COCO format (the same 7 images), detection files in and out (round trip bit for bit), ground
truth as detections scoring 1, VOC numbers equal to the reference loop on the XML's own numbers,
COCO numbers equal to pycocotools called directly, 2-process gloo evaluation equal to 1 process,
clear errors for bad input, plots, and the training loop's evaluation going through the same entry
point (COCO AP for COCO-format val data).

The checkpoint is a width-1/8 SSD at 64 px with random weights whose box regression head is zeroed:
every detection is a prior box with a random-but-deterministic score, so some of them hit the
objects and the APs are small but not all zero."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import launch_ranks
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssd import Detector
from ssd.bench.voc_eval import reference_voc_eval
from ssd.checkpoint import make_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import Config, ModelConfig, from_dict, load_config
from ssd.data.dataset import build_dataset
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.engine.evalset import EvalSet, evaluate_predictions
from ssd.engine.evaluate import predict_checkpoint
from ssd.engine.train import train
from ssd.metrics.coco import COCO_STATS
from ssd.model import build_ssd

SIZE = 64
NUM_VAL = 7  # odd: two ranks get 4 and 3 images
PERFECT_07 = sum([1 / 11.0] * 11)  # the reference's 11 additions of 1/11
COCO_IDS = {1: 7, 2: 3, 3: 12, 4: 40}  # label -> category id in the remapped COCO file
MODEL = {
    "num_classes": 5,
    "input_size": SIZE,
    "width": 0.125,
    "batch_norm": "all",
    "dropout": 0.0,
    "extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}],
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Shapes (16 train, 7 val, 64 px); voc.yaml, coco.yaml (the file's ids 1..4) and remapped.yaml
    (category ids 7, 3, 12, 40, listed out of order); tiny.pt. Read only."""
    ws = tmp_path_factory.mktemp("eval")
    root = ws / "shapes"
    generate_shapes(root, 16, NUM_VAL, size=SIZE, seed=5)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    coco["categories"] = [{**c, "id": COCO_IDS[c["id"]]} for c in reversed(coco["categories"])]
    coco["annotations"] = [{**a, "category_id": COCO_IDS[a["category_id"]]} for a in coco["annotations"]]
    (root / "annotations" / "remapped_val.json").write_text(json.dumps(coco))
    voc = {"format": "voc", "root": str(root), "classes": SHAPES_CLASSES}
    for name, val in (
        ("voc", {**voc, "split": "val"}),
        (
            "coco",
            {
                "format": "coco",
                "images": str(root / "JPEGImages"),
                "classes": SHAPES_CLASSES,
                "annotations": str(root / "annotations" / "instances_val.json"),
            },
        ),
        (
            "remapped",
            {
                "format": "coco",
                "images": str(root / "JPEGImages"),
                "classes": SHAPES_CLASSES,
                "annotations": str(root / "annotations" / "remapped_val.json"),
            },
        ),
    ):
        cfg = {
            "model": MODEL,
            "data": {"train": {**voc, "split": "train"}, "val": val, "num_workers": 0},
            "eval": {"batch_size": 3},
        }
        (ws / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    from ssd.model import build_ssd

    model_cfg = from_dict(ModelConfig, MODEL, "model")
    model = build_ssd(model_cfg)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith("head.loc."):
                p.zero_()  # boxes = the priors
            elif key.startswith("head.conf.") and key.endswith("weight"):
                p.mul_(0.05)  # milder scores: fewer exact ties
    save_checkpoint(make_checkpoint(model.state_dict(), model_cfg, SHAPES_CLASSES, "test"), ws / "tiny.pt")
    return ws


@pytest.fixture(scope="module")
def weights_runs(ws, tmp_path_factory) -> dict[str, Path]:
    """``ssd eval --weights tiny.pt --json --out-dir`` on voc.yaml and remapped.yaml. Read only."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(ws / "cache"))
        for name in ("voc", "remapped"):
            run_dir = tmp_path_factory.mktemp(f"weights-{name}")
            assert (
                ssd_eval(
                    ws / f"{name}.yaml",
                    "--weights",
                    ws / "tiny.pt",
                    "--json",
                    run_dir / "metrics.json",
                    "--out-dir",
                    run_dir / "out",
                )
                == 0
            )
            out[name] = run_dir
    return out


def ssd_eval(*args) -> int:
    return main(["eval", *(str(a) for a in args)])


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def voc_objects(ws: Path) -> dict[str, list[tuple[str, tuple[float, ...]]]]:
    """The val XMLs' objects, read here with ElementTree (independently of ssd.data.voc)."""
    root = ws / "shapes"
    out = {}
    for image_id in (root / "ImageSets" / "Main" / "val.txt").read_text().split():
        objects = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot().iter("object")
        out[image_id] = [
            (o.findtext("name"), tuple(float(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")))
            for o in objects
        ]
    return out


# --- the --weights path ------------------------------------------------------------------------------


def test_weights_on_voc_and_coco_data_of_the_same_images(ws, weights_runs, capsys):
    voc, coco = read_json(weights_runs["voc"] / "metrics.json"), read_json(weights_runs["remapped"] / "metrics.json")
    assert voc["metric"] == "voc07" and coco["metric"] == "coco"  # the default follows the data's format
    assert list(voc["per_class"]) == list(coco["per_class"]) == SHAPES_CLASSES
    assert voc["num_gt"] == coco["num_gt"] and sum(voc["num_gt"].values()) >= 2 * NUM_VAL
    assert 0.0 < voc["map"] < 0.5 and set(COCO_STATS) <= set(coco) and coco["map"] == coco["AP"]
    # the same detections, each in its file's frame: VOC [x1 + 1, y1 + 1, x2 - x1 - 1, ...], COCO [x1, y1, x2 - x1, ...]
    voc_dets, coco_dets = (
        read_json(weights_runs["voc"] / "out" / "detections.json"),
        read_json(weights_runs["remapped"] / "out" / "detections.json"),
    )
    assert len(voc_dets) == len(coco_dets) == NUM_VAL * 200  # post-processing keeps 200 per image
    ids = (ws / "shapes" / "ImageSets" / "Main" / "val.txt").read_text().split()
    for v, c in zip(voc_dets, coco_dets, strict=True):
        assert (v["image_id"], COCO_IDS[v["category_id"]], v["score"]) == (
            ids[c["image_id"] - 1],
            c["category_id"],
            c["score"],
        )
        np.testing.assert_allclose(v["bbox"], np.add(c["bbox"], [1, 1, -1, -1]), rtol=0, atol=1e-9)
    # the VOC metric of the COCO-format data with continuous pixels is that of the XML numbers with the +1
    capsys.readouterr()
    assert (
        ssd_eval(
            ws / "remapped.yaml",
            "eval.voc_pixel_convention=continuous",
            "--detections",
            weights_runs["remapped"] / "out" / "detections.json",
            "--metric",
            "voc07",
            "--json",
            weights_runs["remapped"] / "as_voc.json",
        )
        == 0
    )
    assert read_json(weights_runs["remapped"] / "as_voc.json")["per_class"] == voc["per_class"]
    table = capsys.readouterr().out
    assert all(name in table for name in SHAPES_CLASSES) and "mAP@0.5 (VOC07 11-point)" in table


def test_split_train_scores_the_training_images_with_evaluation_transforms(ws, weights_runs, tmp_path):
    """``--split train`` is data.train scored as data.val would be: the same numbers as a config whose
    data.val names the training split, other ones than data.val's, and comp4 files named after it."""
    weights = ("--weights", ws / "tiny.pt")
    assert (
        ssd_eval(
            ws / "voc.yaml", *weights, "--split", "train", "--json", tmp_path / "a.json", "--out-dir", tmp_path / "d"
        )
        == 0
    )
    assert ssd_eval(ws / "voc.yaml", "data.val.split=train", *weights, "--json", tmp_path / "b.json") == 0
    train, as_val = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    val = read_json(weights_runs["voc"] / "metrics.json")
    assert train == as_val and train["num_gt"] != val["num_gt"]
    assert sum(train["num_gt"].values()) > sum(val["num_gt"].values())  # 16 training images against 7
    assert sorted(p.name for p in (tmp_path / "d").glob("comp4_det_*")) == [
        f"comp4_det_train_{name}.txt" for name in sorted(SHAPES_CLASSES)
    ]


def test_voc_data_gets_cocos_ap_over_iou_050_095_beside_voc07(ws, weights_runs, tmp_path, capsys):
    voc = read_json(weights_runs["voc"] / "metrics.json")
    detections = weights_runs["voc"] / "out" / "detections.json"
    assert ssd_eval(ws / "voc.yaml", "--detections", detections, "--metric", "coco", "--json", tmp_path / "c.json") == 0
    coco = read_json(tmp_path / "c.json")
    assert voc["metric"] == "voc07" and voc["map_50_95"] == pytest.approx(coco["map"], abs=1e-12)
    assert coco["map_50_95"] == coco["map"] == coco["AP"] and 0.0 <= coco["map"] < voc["map"]
    capsys.readouterr()
    assert ssd_eval(ws / "voc.yaml", "--detections", detections) == 0
    line = f"mAP@[.50:.95] (COCO's AP over IoU 0.50..0.95, same detections): {voc['map_50_95']:.4f}"
    assert line in capsys.readouterr().out


def test_the_table_and_json_give_each_class_its_training_boxes(ws, weights_runs, tmp_path, capsys):
    """``#train``: the data.train objects of each class (difficult ones left out), counted here from the XMLs
    with ElementTree; ``-`` when data.train cannot be read on this machine."""
    root = ws / "shapes"
    counts = dict.fromkeys(SHAPES_CLASSES, 0)
    for image_id in (root / "ImageSets" / "Main" / "train.txt").read_text().split():
        for obj in ET.parse(root / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
            counts[obj.findtext("name")] += (obj.findtext("difficult") or "0") == "0"
    assert read_json(weights_runs["voc"] / "metrics.json")["num_train_boxes"] == counts and sum(counts.values()) > 0
    detections = weights_runs["voc"] / "out" / "detections.json"
    capsys.readouterr()
    assert ssd_eval(ws / "voc.yaml", "--detections", detections) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["class", "#GT", "AP", "#train"]
    assert {line.split()[0]: int(line.split()[3]) for line in table[1 : 1 + len(SHAPES_CLASSES)]} == counts
    assert ssd_eval(ws / "voc.yaml", f"data.train.root={tmp_path / 'nowhere'}", "--detections", detections) == 0
    assert [line.split()[3] for line in capsys.readouterr().out.splitlines()[1 : 1 + len(SHAPES_CLASSES)]] == ["-"] * 4


def test_comp4_files_hold_the_detections_in_the_xml_frame(weights_runs):
    dets = read_json(weights_runs["voc"] / "out" / "detections.json")
    files = sorted(p.name for p in (weights_runs["voc"] / "out").glob("comp4_*"))
    assert files == sorted(f"comp4_det_val_{name}.txt" for name in SHAPES_CLASSES)
    for label, name in enumerate(SHAPES_CLASSES, 1):
        lines = (weights_runs["voc"] / "out" / f"comp4_det_val_{name}.txt").read_text().splitlines()
        mine = [d for d in dets if d["category_id"] == label]
        assert len(lines) == len(mine) > 0
        for line, d in zip(lines[:20], mine[:20], strict=True):
            x, y, w, h = d["bbox"]
            expected = f"{d['image_id']} {d['score']:.3f} {x:.1f} {y:.1f} {x + w:.1f} {y + h:.1f}"
            assert line == expected
    # COCO: the file stem
    assert (
        sorted(p.name for p in (weights_runs["remapped"] / "out").glob("comp4_*"))[0]
        == "comp4_det_remapped_val_circle.txt"
    )


def test_detections_json_round_trips_to_identical_metrics(ws, weights_runs, tmp_path):
    for name in ("voc", "remapped"):
        run = weights_runs[name]
        assert (
            ssd_eval(
                ws / f"{name}.yaml",
                "--detections",
                run / "out" / "detections.json",
                "--json",
                tmp_path / f"{name}.json",
                "--out-dir",
                tmp_path / name,
            )
            == 0
        )
        assert read_json(tmp_path / f"{name}.json") == read_json(run / "metrics.json")  # every float identical
        assert (tmp_path / name / "detections.json").read_bytes() == (run / "out" / "detections.json").read_bytes()


def test_training_loop_evaluates_coco_val_data_with_coco_ap_through_the_same_entry_point(ws, tmp_path):
    cfg = yaml.safe_load((ws / "remapped.yaml").read_text())
    cfg["train"] = {
        "max_iter": 2,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 1e-3,
        "warmup_iters": 1,
        "device": "cpu",
        "eval_period": 100,
        "checkpoint_period": 100,
        "tensorboard": False,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    summary = train(load_config(tmp_path / "run.yaml"), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in rows if "eval" in r]
    assert evaluation["eval"] == "coco" and list(evaluation["per_class"]) == SHAPES_CLASSES
    assert (
        ssd_eval(tmp_path / "run.yaml", "--weights", tmp_path / "run" / "best.pt", "--json", tmp_path / "m.json") == 0
    )
    assert read_json(tmp_path / "m.json")["map"] == evaluation["map"] == summary["best_map"]


# --- one evaluation path, the deployment preprocessing ------------------------------------------------


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory) -> Path:
    """5 val images enlarged to 5 different non-square sizes (annotation sizes updated; the boxes,
    irrelevant to predictions, stay inside). Read only."""
    root = tmp_path_factory.mktemp("odd") / "shapes"
    generate_shapes(root, 0, 5, size=SIZE, seed=6)
    for i, image_id in enumerate((root / "ImageSets" / "Main" / "val.txt").read_text().split()):
        w, h = SIZE + 37 * i + 11, SIZE + 23 * (4 - i) + 5
        path = root / "JPEGImages" / f"{image_id}.jpg"
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (w, h), interpolation=cv2.INTER_CUBIC))
        xml = ET.parse(root / "Annotations" / f"{image_id}.xml")
        xml.find("size/width").text, xml.find("size/height").text = str(w), str(h)
        xml.write(root / "Annotations" / f"{image_id}.xml")
    return root


def test_a_normalize_then_bilinear_checkpoint_evaluates_on_what_detector_predicts(odd_sizes, tmp_path):
    """Converted torchvision weights normalise, then resize the float image: ``ssd eval``'s loader path
    (original images to the device, :mod:`ssd.preprocess`) gives Detector's detections bit for bit."""
    model_cfg = from_dict(ModelConfig, {**MODEL, "preprocess": {"resize": "normalize_then_bilinear"}}, "model")
    torch.manual_seed(3)
    save_checkpoint(
        make_checkpoint(build_ssd(model_cfg).state_dict(), model_cfg, SHAPES_CLASSES, "test"), tmp_path / "tv.pt"
    )
    cfg = from_dict(
        Config,
        {
            "model": MODEL,
            "data": {
                "val": {"format": "voc", "root": str(odd_sizes), "split": "val", "classes": SHAPES_CLASSES},
                "num_workers": 0,
            },
        },
    )
    dataset, predictions = predict_checkpoint(cfg, str(tmp_path / "tv.pt"), "cpu", batch_size=2)
    # both in their default memory format: channels_last on the CPU (train.channels_last auto, Detector's None)
    detector = Detector.from_checkpoint(tmp_path / "tv.pt", device="cpu", score_thresh=0.01, batch_size=2, fuse=False)
    assert len({rec.width for rec in dataset.records}) == 5
    for rec, got in zip(dataset.records, detector([rec.path for rec in dataset.records]), strict=True):
        expected = predictions[rec.image_id]
        assert len(expected["scores"]) == 200  # random weights: the full 200 per image
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(expected[key], got[key].numpy(), err_msg=f"{rec.image_id} {key}")


def imported_modules(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    return {n.module for n in nodes if isinstance(n, ast.ImportFrom)} | {
        a.name for n in nodes if isinstance(n, ast.Import) for a in n.names
    }


def test_evaluation_and_deployment_share_preprocessing_without_importing_each_other():
    package = Path(__file__).resolve().parent.parent / "ssd"
    for path in (package / "engine").glob("*.py"):
        assert not any(m.startswith("ssd.inference") for m in imported_modules(path, top_level_only=False)), path.name
    assert "ssd.preprocess" in imported_modules(package / "inference.py", top_level_only=True)
    for name in ("inference.py", "export.py", "fuse.py"):  # deployment: not even inside a function
        assert not any(m.startswith("ssd.engine") for m in imported_modules(package / name, top_level_only=False)), name


# --- detections files ---------------------------------------------------------------------------------


def test_ground_truth_as_detections_scores_one_in_both_formats(ws, tmp_path):
    objects = voc_objects(ws)
    voc_gt = [
        {
            "image_id": image_id,
            "category_id": SHAPES_CLASSES.index(name) + 1,
            "score": 1.0,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
        }
        for image_id, objs in objects.items()
        for name, (x1, y1, x2, y2) in objs
    ]
    (tmp_path / "voc_gt.json").write_text(json.dumps(voc_gt))
    coco = read_json(ws / "shapes" / "annotations" / "remapped_val.json")
    coco_gt = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco["annotations"]
    ]
    (tmp_path / "coco_gt.json").write_text(json.dumps(coco_gt))
    expected = {"voc07": PERFECT_07, "voc": 1.0, "coco": 1.0}
    for config, dets in (("voc", "voc_gt.json"), ("remapped", "coco_gt.json")):
        for metric in ("voc07", "voc", "coco"):
            out = tmp_path / f"{config}-{metric}.json"
            assert (
                ssd_eval(ws / f"{config}.yaml", "--detections", tmp_path / dets, "--metric", metric, "--json", out) == 0
            )
            result = read_json(out)
            assert result["map"] == expected[metric] and set(result["per_class"].values()) == {expected[metric]}, (
                config,
                metric,
            )
            if metric == "coco":
                assert result["AP50"] == result["AP75"] == result["AR100"] == 1.0


def jittered(objects: list[tuple[int, object, tuple]], rng: np.random.Generator) -> list[dict]:
    """Detections near the ground truth (0-2 per object, a tenth of a side of noise), mislabelled
    ones and background boxes, scores on a 0.05 grid (ties): ``(label, image_id, xyxy)`` in."""
    out = []
    image_ids = sorted({image_id for _, image_id, _ in objects}, key=str)
    for label, image_id, (x1, y1, x2, y2) in objects:
        for _ in range(int(rng.integers(0, 3))):
            nx1, ny1, nx2, ny2 = np.add((x1, y1, x2, y2), rng.normal(0, 0.1 * (x2 - x1 + 1), 4)).tolist()
            lab = label if rng.random() < 0.9 else int(rng.integers(1, 5))
            out.append(
                (
                    image_id,
                    lab,
                    [nx1, ny1, max(nx2 - nx1, 0.5), max(ny2 - ny1, 0.5)],
                    float(np.round(rng.random() * 20) / 20),
                )
            )
    for _ in range(25):
        x, y = rng.uniform(1, 40, 2).tolist()
        out.append(
            (
                image_ids[int(rng.integers(len(image_ids)))],
                int(rng.integers(1, 5)),
                [x, y, *rng.uniform(3, 24, 2).tolist()],
                float(np.round(rng.random() * 10) / 20),
            )
        )
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in out]


def test_voc_numbers_equal_the_reference_loop_on_the_xml_numbers(ws, tmp_path):
    objects = voc_objects(ws)
    flat = [(SHAPES_CLASSES.index(n) + 1, image_id, box) for image_id, objs in objects.items() for n, box in objs]
    dets = jittered(flat, np.random.default_rng(3))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    # the reference's inputs, per image in split order: detections xyxy = [x, y, x + w, y + h] of the file
    ids = list(objects)
    gt = [
        {
            "boxes": np.array([b for _, b in objects[i]]).reshape(-1, 4),
            "labels": np.array([SHAPES_CLASSES.index(n) + 1 for n, _ in objects[i]]),
            "difficult": np.zeros(len(objects[i]), bool),
        }
        for i in ids
    ]
    ref_dets = [
        {
            "boxes": np.array(
                [
                    [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                    for d in dets
                    if d["image_id"] == i
                ]
            ).reshape(-1, 4),
            "scores": np.array([d["score"] for d in dets if d["image_id"] == i]),
            "labels": np.array([d["category_id"] for d in dets if d["image_id"] == i]),
        }
        for i in ids
    ]
    for metric, convention in (("voc07", "inclusive"), ("voc", "inclusive"), ("voc07", "continuous")):
        out = tmp_path / f"{metric}-{convention}.json"
        assert (
            ssd_eval(
                ws / "voc.yaml",
                f"eval.voc_pixel_convention={convention}",
                "--detections",
                tmp_path / "dets.json",
                "--metric",
                metric,
                "--json",
                out,
            )
            == 0
        )
        result = read_json(out)
        ref = [
            reference_voc_eval(ref_dets, gt, c, 0.5, metric == "voc07", 1.0 if convention == "inclusive" else 0.0)
            for c in range(1, 5)
        ]
        assert list(result["per_class"].values()) == ref, (metric, convention)
        assert result["map"] == float(np.mean(ref)) and 0.2 < result["map"] < 0.95


def test_coco_numbers_equal_pycocotools_called_directly(ws, tmp_path):
    ann = ws / "shapes" / "annotations" / "remapped_val.json"
    coco = read_json(ann)
    label_of = {cat: label for label, cat in COCO_IDS.items()}
    flat = [
        (
            label_of[a["category_id"]],
            a["image_id"],
            (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]),
        )
        for a in coco["annotations"]
    ]
    dets = [{**d, "category_id": COCO_IDS[d["category_id"]]} for d in jittered(flat, np.random.default_rng(4))]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert ssd_eval(ws / "remapped.yaml", "--detections", tmp_path / "dets.json", "--json", tmp_path / "m.json") == 0
    ours = read_json(tmp_path / "m.json")
    gt = COCO(str(ann))
    direct = COCOeval(gt, gt.loadRes(str(tmp_path / "dets.json")), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert [ours[k] for k in COCO_STATS] == [float(s) for s in direct.stats]
    assert 0.1 < ours["AP"] < 0.9 and ours["map"] == ours["AP"]
    for k, cat in enumerate(direct.params.catIds):
        assert ours["per_class"][SHAPES_CLASSES[label_of[cat] - 1]] == float(
            np.mean(direct.eval["precision"][:, :, k, 0, 2])
        )


BAD_FILES = [
    ("voc", "not json {", "not a readable JSON file"),
    ("voc", '{"image_id": "val_000000"}', "expected a JSON list of detections"),
    (
        "voc",
        (
            '[{"image_id": "val_000000", "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}, '
            '{"image_id": "val_000000", "category_id": 1, "bbox": [1, 1, 5, 5]}]'
        ),
        "entry 1: missing key(s) score",
    ),
    (
        "voc",
        '[{"image_id": "val_000000", "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}, 3]',
        "entry 1: expected an object",
    ),
    (
        "voc",
        '[{"image_id": "val_000099", "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]',
        "entry 0: unknown image_id 'val_000099'",
    ),
    ("voc", '[{"image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]', "entry 0: unknown image_id 0"),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 5, "bbox": [1, 1, 5, 5], "score": 0.5}]',
        "entry 0: unknown category_id 5 (valid: 1..4",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 0, "bbox": [1, 1, 5, 5], "score": 0.5}]',
        "entry 0: unknown category_id 0",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 1, "bbox": [1, 1, 5], "score": 0.5}]',
        "entry 0: bbox must be 4 numbers",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 1, "bbox": [1, 1, "5", 5], "score": 0.5}]',
        "entry 0: bbox must be 4 numbers",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 1, "bbox": [1, 1, -1.5, 5], "score": 0.5}]',
        "entry 0: bbox [1, 1, -1.5, 5] has a negative size",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 1, "bbox": [1, 1, 5, NaN], "score": 0.5}]',
        "entry 0: bbox [1, 1, 5, nan] has a non-finite value",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 1, "bbox": [1, 1, 5, 5], "score": NaN}]',
        "entry 0: score must be a finite number",
    ),
    (
        "voc",
        '[{"image_id": "val_000001", "category_id": 1, "bbox": [1, 1, 5, 5], "score": "high"}]',
        "entry 0: score must be a finite number",
    ),
    (
        "remapped",
        '[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]',
        "entry 0: unknown category_id 1 (valid: the annotation file's category ids [3, 7, 12, 40])",
    ),
    (
        "remapped",
        '[{"image_id": "1", "category_id": 7, "bbox": [1, 1, 5, 5], "score": 0.5}]',
        "entry 0: unknown image_id '1'",
    ),
    (
        "remapped",
        '[{"image_id": 2, "category_id": 7, "bbox": [1, 1, -0.5, 5], "score": 0.5}]',
        "entry 0: bbox [1, 1, -0.5, 5] has a negative size",
    ),
]


@pytest.mark.parametrize("config, content, message", BAD_FILES, ids=[f"{c}-{m[:28]}" for c, _, m in BAD_FILES])
def test_bad_detection_files_exit_2_naming_the_file_and_entry(ws, tmp_path, capsys, config, content, message):
    path = tmp_path / "dets.json"
    path.write_text(content)
    assert ssd_eval(ws / f"{config}.yaml", "--detections", path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ssd eval: error: {path}: ") and message in err and "\n" not in err, err


def test_a_voc_box_of_zero_inclusive_width_is_accepted(ws, tmp_path):
    """In the XML's inclusive numbers ``xmax = xmin - 1`` is an empty box (a clamped prediction):
    valid, never a match."""
    path = tmp_path / "dets.json"
    path.write_text('[{"image_id": "val_000001", "category_id": 1, "bbox": [64.0, 3.0, -1.0, 10.0], "score": 0.5}]')
    assert ssd_eval(ws / "voc.yaml", "--detections", path, "--json", tmp_path / "m.json") == 0
    assert read_json(tmp_path / "m.json")["map"] == 0.0


def test_bad_arguments_exit_2(ws, tmp_path, capsys):
    assert ssd_eval(ws / "voc.yaml", "--detections", tmp_path / "missing.json") == 2
    assert f"{tmp_path / 'missing.json'}: detections file not found" in capsys.readouterr().err
    assert ssd_eval(ws / "voc.yaml", "--weights", ws / "tiny.pt", "--batch-size", "0") == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: exactly one of --weights / --detections
        ssd_eval(ws / "voc.yaml", "--weights", ws / "tiny.pt", "--detections", tmp_path / "d.json")
    assert exit_info.value.code == 2
    three = from_dict(ModelConfig, {**MODEL, "num_classes": 4}, "model")
    from ssd.model import build_ssd

    save_checkpoint(
        make_checkpoint(build_ssd(three).state_dict(), three, ["a", "b", "c"], "test"), tmp_path / "three.pt"
    )
    capsys.readouterr()
    assert ssd_eval(ws / "voc.yaml", "--weights", tmp_path / "three.pt") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'three.pt'}: the model detects 3 classes" in err and "data.val has 4" in err


def test_duplicate_image_ids_are_refused(ws):
    cfg = load_config(ws / "voc.yaml", [f"data.val.root=[{ws / 'shapes'}, {ws / 'shapes'}]"])
    dataset = build_dataset(cfg.data.val, None, train=False, key="data.val")
    with pytest.raises(ValueError, match="image id 'val_000000' appears twice in the evaluation set"):
        EvalSet(dataset)


def test_images_without_predictions_count_as_misses(ws):
    dataset = build_dataset(load_config(ws / "voc.yaml").data.val, None, train=False, key="data.val")
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    res = evaluate_predictions(dataset, {rec.image_id: empty for rec in dataset.records[:3]})
    assert res["metric"] == "voc07" and res["map"] == 0.0 and sum(res["num_gt"].values()) > 0


# --- plots ---------------------------------------------------------------------------------------------


def test_plots_write_one_png_per_class(ws, weights_runs, tmp_path):
    for name, metric in (("voc", "voc07"), ("remapped", "coco")):
        out = tmp_path / name
        assert (
            ssd_eval(
                ws / f"{name}.yaml",
                "--detections",
                weights_runs[name] / "out" / "detections.json",
                "--metric",
                metric,
                "--plots",
                out,
            )
            == 0
        )
        assert sorted(p.name for p in out.iterdir()) == sorted(f"pr_{c}.png" for c in SHAPES_CLASSES)
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in out.iterdir())


def test_plots_without_matplotlib_is_a_clear_error(ws, weights_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert (
        ssd_eval(
            ws / "voc.yaml", "--detections", weights_runs["voc"] / "out" / "detections.json", "--plots", tmp_path / "p"
        )
        == 2
    )
    assert "--plots needs matplotlib, which is not installed: pip install 'ssd[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# --- distributed ---------------------------------------------------------------------------------------


def launch(world: int, args: list, cwd: Path) -> list[subprocess.CompletedProcess]:
    """``world`` ranks of ``python -m ssd eval ARGS`` with torchrun's environment."""
    return launch_ranks(world, ["-m", "ssd", "eval", *(str(a) for a in args)], cwd)


def test_two_gloo_processes_give_exactly_the_single_process_metric(ws, tmp_path, capsys):
    """Batch size 1 and one thread on both sides (per-image arithmetic then depends on neither the
    batch nor the process), so the predictions, and not only the metric, must be bit-identical;
    7 images split 4 + 3."""

    def args(out: Path) -> list:
        options = ["--batch-size", 1, "--device", "cpu", "--json", out / "metrics.json", "--out-dir", out]
        return [ws / "voc.yaml", "--weights", ws / "tiny.pt", *options]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives the ranks
    try:
        assert ssd_eval(*args(tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(threads)
    ranks = launch(2, args(tmp_path / "ranks"), tmp_path)
    for rank, res in enumerate(ranks):
        assert res.returncode == 0, f"rank {rank}:\n{res.stdout[-3000:]}"
    assert "rank 0: 4 images" in ranks[0].stdout and "rank 1: 3 images" in ranks[1].stdout
    assert "mAP@0.5" in ranks[0].stdout and "mAP@0.5" not in ranks[1].stdout  # only rank 0 reports
    assert read_json(tmp_path / "ranks" / "metrics.json") == read_json(tmp_path / "single" / "metrics.json")
    assert (tmp_path / "ranks" / "detections.json").read_bytes() == (
        tmp_path / "single" / "detections.json"
    ).read_bytes()
    assert len(read_json(tmp_path / "ranks" / "detections.json")) == NUM_VAL * 200  # no image counted twice
