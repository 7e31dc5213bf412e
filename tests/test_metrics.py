"""ssd.metrics: VOC AP pinned on hand-computed cases and equal, bit for bit, to an independent
loop transcription of py-faster-rcnn's voc_eval (ssd/bench/voc_eval.py) on randomised cases;
COCO numbers equal to calling pycocotools directly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssd.bench.voc_eval import reference_voc_eval
from ssd.metrics.coco import COCO_STATS, coco_eval, coco_from_dict
from ssd.metrics.voc import ClassDetections, ClassGroundTruth, class_tp_fp, voc_map

# 11 additions of 1/11, as the reference does them: a perfect VOC07 score is 1.0000000000000002
PERFECT_07 = sum([1 / 11.0] * 11)


def image(boxes, labels, difficult=None) -> dict:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return {"boxes": boxes, "labels": np.asarray(labels, np.int64), "difficult": difficult}


def dets(boxes, scores, labels) -> dict:
    return {
        "boxes": np.asarray(boxes, float).reshape(-1, 4),
        "scores": np.asarray(scores, float),
        "labels": np.asarray(labels, np.int64),
    }


# --- VOC: hand-computed ---------------------------------------------------------------------------


def hand_case():
    """Image 0: A (1,1,10,10), B (20,20,30,30) difficult; image 1: C (5,5,15,15); all class 1.
    In score order: d1 = A (TP), d2 = A shifted by 1 (IoU 81/119 > 0.5, A taken: FP), d3 = B
    (difficult: neither), d4 far from C (FP), d5 = C (TP).
    TP 1 0 0 0 1, FP 0 1 0 1 0 -> recall .5 .5 .5 .5 1, precision 1 .5 .5 1/3 .5."""
    gt = [image([[1, 1, 10, 10], [20, 20, 30, 30]], [1, 1], [False, True]), image([[5, 5, 15, 15]], [1])]
    det = [
        dets([[1, 1, 10, 10], [2, 2, 11, 11], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1]),
        dets([[40, 40, 50, 50], [5, 5, 15, 15]], [0.6, 0.5], [1, 1]),
    ]
    return det, gt


def test_voc07_and_area_ap_of_a_hand_computed_case():
    det, gt = hand_case()
    ap07 = voc_map(det, gt, 2, use_07_metric=True)
    # 11-point: t = 0 .. 0.5 (6 points) see precision 1, t = 0.6 .. 1.0 (5 points) see 0.5
    assert ap07["ap"][1] == pytest.approx(8.5 / 11, abs=1e-15) and ap07["map"] == ap07["ap"][1]
    # area: recall 0 -> .5 at envelope 1, .5 -> 1 at envelope .5
    assert voc_map(det, gt, 2, use_07_metric=False)["ap"][1] == 0.75
    rec, prec = ap07["curves"][1]
    np.testing.assert_array_equal(rec, [0.5, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(prec, [1, 0.5, 0.5, 1 / 3, 0.5], rtol=1e-15)
    assert ap07["npos"] == {1: 2}


def test_a_match_needs_iou_strictly_above_one_half():
    gt = [image([[1, 1, 10, 10]], [1])]  # inclusive: 10 x 10 = 100 pixels
    half = [dets([[1, 1, 10, 5]], [0.9], [1])]  # 10 x 5 = 50 pixels inside it: IoU exactly 0.5
    above = [dets([[1, 1, 10, 6]], [0.9], [1])]  # IoU 0.6
    assert voc_map(half, gt, 2)["map"] == 0.0
    assert voc_map(above, gt, 2)["map"] == PERFECT_07 == 1.0000000000000002
    gt_c = [image([[0, 0, 10, 10]], [1])]
    assert voc_map([dets([[0, 0, 10, 5]], [0.9], [1])], gt_c, 2, inclusive=False)["map"] == 0.0  # 50 / 100
    assert voc_map([dets([[0, 0, 10, 5.01]], [0.9], [1])], gt_c, 2, inclusive=False, use_07_metric=False)["map"] == 1.0


def test_inclusive_and_continuous_conventions_differ_where_the_plus_one_matters():
    gt = [image([[1, 1, 2, 2]], [1])]  # inclusive: 2 x 2 pixels; continuous: 1 x 1
    det = [dets([[1, 1, 2, 3]], [0.9], [1])]  # inclusive: IoU 4 / 6; continuous: 1 / 2
    assert voc_map(det, gt, 2, inclusive=True, use_07_metric=False)["map"] == 1.0
    assert voc_map(det, gt, 2, inclusive=False, use_07_metric=False)["map"] == 0.0


def test_classes_without_ground_truth_or_detections_and_empty_images():
    gt = [image([[1, 1, 10, 10]], [1]), image([], []), image([[1, 1, 10, 10]], [3], [True])]
    det = [dets([[1, 1, 10, 10]], [0.5], [1]), dets([[1, 1, 10, 10]], [0.9], [2]), dets([], [], [])]
    res = voc_map(det, gt, 5, use_07_metric=False)
    assert res["ap"][1] == 1.0
    assert np.isnan(res["ap"][2]) and np.isnan(res["ap"][3]) and np.isnan(res["ap"][4])  # no (non-difficult) GT
    assert res["map"] == 1.0  # NaN classes are left out of the mean
    assert res["npos"] == {1: 1, 2: 0, 3: 0, 4: 0}
    gt[1] = image([[1, 1, 10, 10]], [4])  # class 4 now has GT and no detections: AP 0, counted
    res = voc_map(det, gt, 5, use_07_metric=False)
    assert res["ap"][4] == 0.0 and res["map"] == 0.5
    assert np.isnan(voc_map([dets([], [], [])], [image([], [])], 3)["map"])


def test_inputs_are_not_modified():
    det, gt = hand_case()
    before = copy.deepcopy((det, gt))
    voc_map(det, gt, 2)
    for a, b in zip(det + gt, before[0] + before[1], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# --- VOC: against the independent loop ----------------------------------------------------------------


def random_case(rng: np.random.Generator, integer: bool, num_images: int = 12) -> tuple[list, list]:
    """GT labels 1..4, detection labels 1, 2, 3, 5 (class 4: GT without detections, class 5:
    detections without GT), 0-5 objects per image (empty images), a quarter difficult, detections
    jittered around GT (duplicates included) or anywhere, scores rounded to one decimal (ties)."""
    gts, det = [], []
    for _ in range(num_images):
        k = int(rng.integers(0, 6))
        xy = rng.integers(1, 80, (k, 2)).astype(float)
        wh = rng.integers(0, 40, (k, 2)).astype(float)  # 0: a one-pixel-wide inclusive box
        if not integer:
            xy, wh = xy + rng.random((k, 2)), wh + rng.random((k, 2))
        gts.append(image(np.concatenate([xy, xy + wh], 1), rng.integers(1, 5, k), rng.random(k) < 0.25))
        m = int(rng.integers(0, 15))
        if k:
            base = gts[-1]["boxes"][rng.integers(0, k, m)]
            jitter = rng.integers(-4, 5, (m, 4)) if integer else rng.normal(0, 2, (m, 4))
            boxes = base + jitter
        else:
            boxes = np.sort(rng.integers(1, 80, (m, 4)).astype(float).reshape(m, 2, 2), 1).reshape(m, 4)[
                :, [0, 2, 1, 3]
            ]
        det.append(dets(boxes, np.round(rng.random(m), 1), rng.choice([1, 2, 3, 5], m)))
    return det, gts


@pytest.mark.parametrize("integer", [True, False], ids=["integer-boxes", "float-boxes"])
def test_voc_ap_equals_the_reference_loop_on_random_cases(integer):
    rng = np.random.default_rng(11 if integer else 12)
    compared = 0
    for trial in range(40):
        det, gt = random_case(rng, integer)
        for use_07 in (True, False):
            for inclusive in (True, False):
                ours = voc_map(det, gt, 6, use_07, inclusive=inclusive)
                chunked = voc_map(det, gt, 6, use_07, inclusive=inclusive, max_elements=3)  # IoU in many tiny chunks
                for c in range(1, 6):
                    ref = reference_voc_eval(det, gt, c, 0.5, use_07, 1.0 if inclusive else 0.0)
                    assert ours["ap"][c] == chunked["ap"][c] or np.isnan(ours["ap"][c]) and np.isnan(chunked["ap"][c])
                    if np.isnan(ref):
                        assert np.isnan(ours["ap"][c]), (trial, c)
                    else:
                        assert ours["ap"][c] == ref, (trial, use_07, inclusive, c, ours["ap"][c], ref)
                        compared += 1
                assert ours["ap"][5] != ours["ap"][5]  # class 5 never has GT: NaN
    assert compared > 400


def test_tie_order_follows_numpy_argsort_of_negative_scores():
    """Two detections of equal score on one GT: which is the TP depends only on argsort(-score)."""
    gt = [image([[1, 1, 10, 10]], [1]), image([[1, 1, 10, 10]], [1], [True])]
    det = [dets([[1, 1, 10, 10], [1, 1, 10, 10]], [0.5, 0.5], [1, 1]), dets([[1, 1, 10, 10]], [0.5], [1])]
    tp, fp = class_tp_fp(
        ClassDetections(np.array([0, 0, 1]), np.full(3, 0.5), np.concatenate([d["boxes"] for d in det])),
        ClassGroundTruth(np.array([0, 1]), np.array([[1, 1, 10, 10]] * 2, float), np.array([False, True])),
        2,
    )
    order = np.argsort(-np.full(3, 0.5))
    image_of = np.array([0, 0, 1])[order]
    assert tp.tolist() == [1.0 if i == list(image_of).index(0) else 0.0 for i in range(3)]
    assert fp.sum() == 1.0 and (tp + fp)[image_of == 1].tolist() == [0.0]  # the difficult match is neither
    assert voc_map(det, gt, 2)["ap"][1] == reference_voc_eval(det, gt, 1)


# --- COCO ---------------------------------------------------------------------------------------------

CATEGORIES = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}, {"id": 12, "name": "c"}, {"id": 20, "name": "no-gt"}]


def coco_gt_dict(rng: np.random.Generator) -> dict:
    """4 images (id 13 without objects), non-contiguous category ids (20 without objects), small,
    medium and large boxes, a few crowd regions."""
    images = [{"id": i, "width": 320, "height": 240, "file_name": f"{i}.jpg"} for i in (10, 11, 12, 13)]
    anns = []
    for img in (10, 11, 12):
        for _ in range(int(rng.integers(2, 7))):
            side = float(rng.choice([12.0, 50.0, 130.0])) * rng.uniform(0.8, 1.2)
            x, y = rng.uniform(0, 320 - side), rng.uniform(0, 240 - side) if side < 240 else 0.0
            w, h = side, min(side * rng.uniform(0.6, 1.0), 240.0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img,
                    "category_id": int(rng.choice([3, 7, 12])),
                    "bbox": [x, y, w, h],
                    "area": w * h * 0.8,
                    "iscrowd": int(rng.random() < 0.1),
                }
            )
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def coco_detections(gt: dict, rng: np.random.Generator) -> list[dict]:
    results = []
    for ann in gt["annotations"]:
        for _ in range(int(rng.integers(0, 3))):  # duplicates and misses
            x, y, w, h = np.asarray(ann["bbox"]) + rng.normal(0, 0.08 * ann["bbox"][2], 4)
            results.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "bbox": [x, y, max(w, 1.0), max(h, 1.0)],
                    "score": float(np.round(rng.random(), 2)),
                }
            )
    for _ in range(30):
        x, y, w, h = rng.uniform(0, 200), rng.uniform(0, 150), rng.uniform(5, 100), rng.uniform(5, 80)
        results.append(
            {
                "image_id": int(rng.choice([10, 11, 12, 13])),
                "category_id": int(rng.choice([3, 7, 12, 20])),
                "bbox": [x, y, w, h],
                "score": float(np.round(rng.random() * 0.6, 2)),
            }
        )
    return results


def direct_pycocotools(gt_path, results: list[dict]) -> COCOeval:
    coco = COCO(str(gt_path))
    evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def test_coco_numbers_equal_pycocotools_called_directly(tmp_path, capsys):
    rng = np.random.default_rng(5)
    gt = coco_gt_dict(rng)
    results = coco_detections(gt, rng)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    direct = direct_pycocotools(path, results)
    capsys.readouterr()
    ours = coco_eval(coco_from_dict(json.loads(path.read_text())), results)
    assert capsys.readouterr().out == ""  # pycocotools' prints went to the debug log
    assert list(ours["stats"]) == list(COCO_STATS)
    assert list(ours["stats"].values()) == [float(s) for s in direct.stats]
    assert 0.2 < ours["stats"]["AP"] < 0.9  # a real, non-degenerate case
    for k, cat in enumerate(direct.params.catIds):
        p = direct.eval["precision"][:, :, k, 0, 2]
        if cat == 20:
            assert (p == -1).all() and np.isnan(ours["per_class"][cat])
        else:
            assert ours["per_class"][cat] == float(np.mean(p))
    # AP is the mean of the per-class APs (every class with GT has all 10 x 101 precision points)
    assert ours["stats"]["AP"] == pytest.approx(np.nanmean(list(ours["per_class"].values())), abs=1e-12)
    crowd = {a["id"] for a in gt["annotations"] if a["iscrowd"]}
    assert sum(ours["num_gt"].values()) == len(gt["annotations"]) - len(crowd) and ours["num_gt"][20] == 0


def test_coco_ground_truth_as_detections_scores_one_and_no_detections_score_zero():
    rng = np.random.default_rng(6)
    gt = coco_gt_dict(rng)
    coco = coco_from_dict(gt)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    stats = coco_eval(coco, perfect)["stats"]
    assert stats["AP"] == stats["AP50"] == stats["AP75"] == stats["AR100"] == 1.0
    empty = coco_eval(coco, [])
    assert empty["stats"]["AP"] == 0.0 and set(empty["stats"].values()) <= {0.0, -1.0}
    assert [empty["per_class"][c] for c in (3, 7, 12)] == [0.0, 0.0, 0.0] and np.isnan(empty["per_class"][20])


def test_coco_evaluates_only_the_given_images():
    rng = np.random.default_rng(7)
    gt = coco_gt_dict(rng)
    results = coco_detections(gt, rng)
    subset = coco_eval(coco_from_dict(gt), results, image_ids=[11, 10])
    only = {
        **gt,
        "images": [i for i in gt["images"] if i["id"] in (10, 11)],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in (10, 11)],
    }
    alone = coco_eval(coco_from_dict(only), [r for r in results if r["image_id"] in (10, 11)])
    assert subset["stats"] == alone["stats"] and subset["num_gt"] == alone["num_gt"]
