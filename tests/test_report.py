"""The end-of-training report: the verdict's rules on given evidence, and real runs broken on purpose
(labels of other images, far too few iterations, a memorised handful of images, objects no prior matches),
each giving its verdict in report.json with results.png beside it."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from conftest import tiny_run_dict

from ssd.config import Config, from_dict
from ssd.engine import report as rp
from ssd.engine.results_plot import plot_results
from ssd.engine.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

NO_AUGMENT = {"photometric_p": 0, "channel_swap_p": 0, "expand_p": 0, "crop_min_ious": [None], "flip_p": 0}
BIG_OBJECTS = {"min_side": 0.3, "max_side": 0.6, "max_objects": 2}
PRIORS = {"priors": {"scales": [0.3, 0.5, 0.7, 0.9, 1.05]}}  # every box of BIG_OBJECTS has a prior at 64 px


# --- the rules --------------------------------------------------------------------------------------


def rows(losses: list[float], lrs: list[float]) -> list[dict]:
    return [{"iter": i + 1, "loss": x, "lr": lr} for i, (x, lr) in enumerate(zip(losses, lrs, strict=True))]


def test_the_loss_trend_ignores_the_annealed_tail():
    # 20 rows at lr 1 falling 10 -> 6.2 then flat at 6, then 10 rows annealed to 0.1 falling to 3
    losses = [10 - 0.2 * i for i in range(20)] + [6.0] * 10 + [3.0] * 10
    lrs = [1.0] * 30 + [0.1] * 10
    trend = rp.loss_trend(rows(losses, lrs))
    assert trend["loss_first"] == pytest.approx(sum(losses[:8]) / 8)
    assert trend["loss_last"] == 3.0
    # the 30 rows at high lr: fifths of 6 rows, the last (6.0 x 6) against the one before (6.0 x 4, 6.4, 6.2)
    assert trend["high_lr_change"] == pytest.approx((6.1 - 6.0) / 6.1)
    assert rp.loss_trend(rows([5.0, 4.0], [1.0, 1.0]))["high_lr_change"] is None  # too few rows for a trend
    assert rp.loss_trend([{"iter": 1, "loss": None, "lr": 1.0}])["loss_fell"] is None  # every step skipped


def test_the_gap_standard_error_adds_both_samples_variances():
    assert rp.gap_standard_error(0.9, 100, 0.5, 400) == pytest.approx(math.sqrt(0.9 * 0.1 / 100 + 0.25 / 400))
    assert rp.gap_standard_error(1.2, 10, -0.1, 10) == 0.0  # clamped to [0, 1]: no variance at the ends


def evidence(**changes) -> dict:
    """A healthy run's evidence; ``changes`` break it."""
    base = {"prior_coverage": 0.95, "epochs": 10.0, "loss_first": 8.0, "loss_last": 2.0, "loss_fell": 0.75,
            "high_lr_change": 0.2, "metric": "voc07", "iteration": 1000, "val_map": 0.8, "val_boxes": 900,
            "train_sample_map": 0.85, "train_sample_boxes": 600, "gap": 0.05, "gap_standard_error": 0.02}  # fmt: skip
    return base | changes


@pytest.mark.parametrize(
    "changes, verdict",
    [
        ({}, "healthy"),
        ({"train_sample_map": 0.01, "high_lr_change": 0.01}, "data"),  # fell, then flat
        ({"train_sample_map": 0.01, "epochs": 25.0}, "data"),  # still falling, but seen 25 times
        ({"train_sample_map": 0.01}, "underfitting"),  # still falling after 10 passes: not yet data
        ({"train_sample_map": 0.01, "high_lr_change": 0.01, "loss_fell": 0.1}, "underfitting"),  # nothing learnt
        ({"train_sample_map": 0.01, "high_lr_change": 0.01, "prior_coverage": 0.4}, "priors"),  # priors explain it
        ({"train_sample_map": 0.3, "prior_coverage": 0.59}, "priors"),
        ({"train_sample_map": 0.6, "prior_coverage": 0.4, "val_map": 0.55}, "healthy"),  # fits what it can match
        ({"train_sample_map": 0.3, "high_lr_change": 0.02}, "underfitting"),
        ({"train_sample_map": 0.49, "high_lr_change": None}, "underfitting"),
        ({"train_sample_map": 0.95, "val_map": 0.84, "gap": 0.11}, "overfitting"),
        ({"train_sample_map": 0.95, "val_map": 0.86, "gap": 0.09}, "healthy"),  # within 0.10
        ({"train_sample_map": 0.95, "val_map": 0.8, "gap": 0.15, "gap_standard_error": 0.08}, "healthy"),  # noise
        ({"train_sample_map": None}, "unknown"),  # eval.train_sample: 0
        ({"train_sample_map": None, "prior_coverage": 0.3}, "priors"),  # coverage alone still tells
    ],
)
def test_the_verdict_takes_the_first_rule_that_fits(changes, verdict):
    name, why, advice = rp.decide(evidence(**changes))
    assert name == verdict, why
    assert bool(advice) == (verdict != "healthy")


def test_no_evaluation_gives_no_verdict():
    assert rp.decide({"prior_coverage": 0.9, "epochs": 1.0, **rp.loss_trend([])})[0] == "unknown"


def test_the_advice_names_the_keys_to_change():
    assert "ssd data check" in rp.decide(evidence(train_sample_map=0.01, high_lr_change=0.0))[2][0]
    assert "ssd data fit-priors" in rp.decide(evidence(prior_coverage=0.3, train_sample_map=0.1))[2][0]
    flat = rp.decide(evidence(train_sample_map=0.3, high_lr_change=0.0))[2]
    falling = rp.decide(evidence(train_sample_map=0.3))[2]
    assert "model.width" in flat[0] and "train.max_iter" in falling[0]  # the likelier fix first
    assert "data.augment" in rp.decide(evidence(train_sample_map=0.99, gap=0.19))[2][0]


def test_results_png_is_drawn_or_named_as_missing(tmp_path, monkeypatch, caplog):
    logged = rows([9.0, 7.0, 5.0], [0.1, 1.0, 0.5])
    logged = [r | {"loc": 1.0, "conf": r["loss"] - 1} for r in logged]
    logged.append({"iter": 3, "eval": "voc07", "map": 0.4, "train_sample_map": 0.5, "map_50_95": 0.2})
    path = plot_results(logged, tmp_path / "results.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert plot_results(logged, tmp_path / "other.png") is None
    assert "results.png needs matplotlib" not in caplog.text and "other.png needs matplotlib" in caplog.text
    assert not (tmp_path / "other.png").exists()


# --- runs broken on purpose ----------------------------------------------------------------------------


def run_report(root: Path, out: Path, max_iter: int, augment: dict | None = None, **train_options) -> dict:
    cfg = tiny_run_dict(root, model=PRIORS, max_iter=max_iter, eval_period=max_iter, log_period=2,
                        optimizer="adamw", lr=0.01, **train_options)  # fmt: skip
    if augment is not None:
        cfg["data"]["augment"] = augment
    train(from_dict(Config, cfg), out)
    assert (out / "results.png").is_file()
    return json.loads((out / "report.json").read_text())


def test_labels_of_other_images_give_data(shapes_data, tmp_path):
    """Each training image carries the next one's annotation: after 24 passes the model finds nothing."""
    root = tmp_path / "shifted"
    shutil.copytree(shapes_data(40, 20, 64, 3, **BIG_OBJECTS), root)
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    texts = [(root / "Annotations" / f"{i}.xml").read_text() for i in ids]
    for image_id, text in zip(ids, texts[1:] + texts[:1], strict=True):
        (root / "Annotations" / f"{image_id}.xml").write_text(text)
    report = run_report(root, tmp_path / "run", 120)
    ev = report["evidence"]
    assert report["verdict"] == "data", report["why"]
    assert ev["train_sample_map"] < rp.NEAR_ZERO_MAP and ev["loss_fell"] >= rp.LOSS_FELL
    assert ev["epochs"] == 24 and ev["prior_coverage"] == 1.0


def test_far_too_few_iterations_give_underfitting(shapes_data, tmp_path):
    report = run_report(shapes_data(40, 20, 64, 3, **BIG_OBJECTS), tmp_path / "run", 8)
    assert report["verdict"] == "underfitting", report["why"]
    assert report["evidence"]["epochs"] == pytest.approx(1.6) and report["evidence"]["train_sample_map"] < 0.1
    assert "train.max_iter" in report["advice"][0]


def test_a_memorised_handful_of_images_gives_overfitting(shapes_data, tmp_path):
    """8 training images, no augmentation, 150 steps: perfect on them, poor on 40 others."""
    report = run_report(shapes_data(8, 40, 64, 3, **BIG_OBJECTS), tmp_path / "run", 150, NO_AUGMENT)
    ev = report["evidence"]
    assert report["verdict"] == "overfitting", report["why"]
    assert ev["train_sample_map"] > 0.9 and ev["gap"] > max(rp.MIN_GAP, 2 * ev["gap_standard_error"])


def test_objects_smaller_than_every_prior_give_priors(shapes_data, tmp_path, caplog):
    root = shapes_data(40, 10, 64, 3, min_side=0.05, max_side=0.1)
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        report = run_report(root, tmp_path / "run", 8)
    assert report["verdict"] == "priors", report["why"]
    assert report["evidence"]["prior_coverage"] < rp.LOW_COVERAGE
    # the per-class table: each class's AP beside its training boxes, in the log and in report.json
    boxes = {name: row["train_boxes"] for name, row in report["per_class"].items()}
    assert sum(boxes.values()) == report["evidence"]["train_sample_boxes"]  # all 40 images are the sample
    assert f"report: priors: only {report['evidence']['prior_coverage']:.0%}" in caplog.text
    table = [line.split() for line in caplog.text.splitlines() if line.split()[:1] == ["circle"]]
    assert table == [["circle", table[0][1], table[0][2], str(boxes["circle"])]]  # class, #GT, AP, #train
