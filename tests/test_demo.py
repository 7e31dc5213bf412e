"""``ssd demo`` end to end at toy scale: data generated, trained, metrics.json in the ``ssd eval --json``
format taken from the training's evaluation of best.pt, detections drawn."""

from __future__ import annotations

import json

import cv2
import torch

from ssd.checkpoint import load_checkpoint
from ssd.demo import run_demo

TOY = [
    "model.input_size=64",
    "train.max_iter=6",
    "train.eval_period=3",
    "train.checkpoint_period=6",
    "train.log_period=1",
    "train.batch_size=8",
    "data.num_workers=0",
    "eval.batch_size=16",
]


def test_demo_trains_evaluates_and_draws(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = run_demo(
            tmp_path / "demo", TOY, num_images=3, data={"num_train": 24, "num_val": 6, "size": 80, "seed": 1}
        )
    finally:
        torch.set_num_threads(threads)

    written = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert written == metrics and written["metric"] == "voc07" and written["iterations"] == 6
    assert set(written["per_class"]) == {"circle", "square", "triangle", "star"}
    evals = [json.loads(line) for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "map" in r]
    assert [r["iter"] for r in evals] == [3, 6]
    best = max(evals, key=lambda r: r["map"])  # first of equals, as the engine keeps it
    assert (written["map"], written["best_iteration"]) == (best["map"], best["iter"])
    assert load_checkpoint(tmp_path / "demo" / "run" / "best.pt")["iteration"] == best["iter"]

    drawn = sorted((tmp_path / "demo" / "detections").glob("*.jpg"))
    assert [p.stem for p in drawn] == ["val_000000", "val_000001", "val_000002"]
    assert all(cv2.imread(str(p)).shape == (80, 80, 3) for p in drawn)
