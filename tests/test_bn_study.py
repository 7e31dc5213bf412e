"""The BN study (ssd.studies.bn_study, scripts/bn_study.py) through real short runs on a generated shapes
dataset: variant parsing, the validation subset, the start weights matching the engine's, the plots
and the summary, and a diverging run recorded instead of raised.

Every run is a width-1/8 SSD at 64 px (maps 8, 4, 2, 1) on 24 training images, batch 8, one thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_run_dict

import ssd.engine.train as engine
from ssd.config import BN_ALL, BN_BLOCKS, ConfigError, load_config
from ssd.data.dataset import build_dataset
from ssd.studies import bn_study, bn_study_data, bn_study_report
from ssd.studies.bn_study import Variant, parse_variant, run_study, run_variant, val_subset
from ssd.studies.bn_study_activations import HIST_BINS, start_model
from ssd.studies.bn_study_report import summarize

SIZE = 64
LAYERS = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "fc7", "extras.0", "conf.0"]
ROOT = Path(__file__).resolve().parent.parent


def run_dict(root: Path, **train_options) -> dict:
    options = {"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "tensorboard": False}
    return tiny_run_dict(root, **{**options, **train_options})


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    return shapes_data(24, 8, SIZE, 7)


@pytest.fixture(scope="module")
def study(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """Two variants x 4 iterations (evaluations at 2 and 4) on 5 validation images, with the config's
    optimizer (AdamW; the study's default is SGD). Read only."""
    tmp = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(tmp / "cache"))
        path = write_config(tmp / "run.yaml", run_dict(shapes, time_limit=600, schedule_by_time=True))
        summary = run_study(
            path,
            tmp / "out",
            ["train.seed=3"],
            ["none", "all@3x"],
            iters=4,
            eval_period=2,
            log_period=1,
            val_images=5,
            act_images=4,
            optimizer=None,
        )
    return tmp / "out", summary


# --- variants -------------------------------------------------------------------------------------------


def test_variants_are_presets_or_blocks_joined_by_plus_with_a_relative_or_absolute_lr():
    assert parse_variant("none") == Variant("none", [], 1.0)
    assert parse_variant("all@3x") == Variant("all@3x", list(BN_ALL), 3.0)
    assert parse_variant("backbone").blocks == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"]
    assert parse_variant("extras@0.5x") == Variant("extras@0.5x", ["extras"], 0.5)
    # block order canonical
    assert parse_variant("conv5+conv4@10x") == Variant("conv5+conv4@10x", ["conv4", "conv5"], 10.0)
    # presets combine with blocks: the heads come on top of every feature block, or of the backbone
    assert parse_variant("all+heads").blocks == list(BN_BLOCKS) == [*BN_ALL, "heads"]
    assert parse_variant("heads+backbone@2x") == Variant(
        "heads+backbone@2x", ["conv1", "conv2", "conv3", "conv4", "conv5", "fc", "heads"], 2.0
    )
    assert parse_variant("heads").blocks == ["heads"]
    assert parse_variant("all+extras").blocks == list(BN_ALL)  # overlaps are one set
    # an absolute lr ignores the base lr; a multiple scales it
    none_abs, all_rel = parse_variant("none@lr0.05"), parse_variant("all@3x")
    assert (none_abs.lr, none_abs.lr_mult, none_abs.lr_for(0.01), all_rel.lr_for(0.01)) == (
        0.05,
        1.0,
        0.05,
        pytest.approx(0.03),
    )
    assert parse_variant("all+heads@lr1e-3").lr_for(0.5) == 0.001
    assert [parse_variant(v).dirname for v in ("all@3x", "none@lr0.05", "all+heads@0.5x")] == [
        "all_lr3x",
        "none_lr0.05",
        "all+heads_lr0.5x",
    ]

    with pytest.raises(
        ValueError,
        match=r"variant 'alll': unknown BN block 'alll'; a variant is BLOCKS\[@LR\]: BLOCKS is a preset \(none, all",
    ):
        parse_variant("alll")
    with pytest.raises(
        ValueError,
        match=r"variant 'all\+head': unknown BN block 'head'; "
        r".*BN block \(conv1, conv2, conv3, conv4, conv5, fc, extras, heads\)",
    ):
        parse_variant("all+head")
    with pytest.raises(ValueError, match=r"variant 'conv4\+fc7': unknown BN block 'fc7'"):
        parse_variant("conv4+fc7")
    with pytest.raises(ValueError, match=r"variant 'all\+': unknown BN block ''"):
        parse_variant("all+")
    with pytest.raises(ValueError, match=r"variant 'none\+heads': 'none' cannot be combined with other blocks"):
        parse_variant("none+heads")
    # the default run: an SGD sweep at absolute lrs, so it does not depend on the config's (AdamW) lr
    defaults = [parse_variant(v) for v in bn_study.DEFAULT_VARIANTS]
    assert bn_study.DEFAULT_OPTIMIZER == "sgd" and all(v.lr is not None for v in defaults)
    assert len({(tuple(v.blocks), v.lr) for v in defaults}) == len(defaults)
    assert {tuple(v.blocks) for v in defaults} == {(), tuple(BN_ALL), tuple(BN_BLOCKS)}

    for bad in ("fast", "3", "0x", "-1x", "lr", "lr-0.1", "lrnan", "0.05lr"):  # a bare number is ambiguous: 3x or lr3?
        with pytest.raises(
            ValueError,
            match=f"variant 'all@{bad}': after @ write a multiple of the base lr like 3x or 0.5x, "
            f"or an absolute lr like lr0.05 \\(got '{bad}'\\)",
        ):
            parse_variant(f"all@{bad}")


def test_loss_rebound_is_the_largest_rise_above_the_lowest_loss_so_far():
    assert bn_study_report.loss_rebound({"iter": [5, 10, 15, 20, 25], "loss": [20.0, 8.0, 12.0, 6.0, 9.0]}) == (1.5, 15)
    assert bn_study_report.loss_rebound({"iter": [5, 10], "loss": [20.0, 10.0]}) == (1.0, None)  # only falling
    assert bn_study_report.loss_rebound({"iter": [], "loss": []}) == (1.0, None)


def test_study_arguments_are_checked_before_anything_runs(shapes, tmp_path):
    path = write_config(tmp_path / "run.yaml", run_dict(shapes))
    with pytest.raises(ValueError, match="--iters must be >= 1, got 0"):
        run_study(path, tmp_path / "out", iters=0)
    with pytest.raises(ValueError, match=r"--variants: duplicate variant in \['all', 'all'\]"):
        run_study(path, tmp_path / "out", variants=["all", "all"])
    with pytest.raises(
        ValueError,
        match=r"--variants: all@2x and all\+extras@lr0.002 are the same run \(BN \['conv1', .*'extras'\], lr 0.002\)",
    ):
        run_study(path, tmp_path / "out", variants=["none", "all@2x", "all+extras@lr0.002"])  # the config's lr is 1e-3
    with pytest.raises(ValueError, match="--lr must be a positive number, got -0.1"):
        run_study(path, tmp_path / "out", lr=-0.1)
    with pytest.raises(ConfigError, match="train.optimizer"):
        run_study(path, tmp_path / "out", optimizer="adam")
    assert not (tmp_path / "out").exists()


# --- data ---------------------------------------------------------------------------------------------


def test_val_subset_is_the_first_images_without_touching_the_data(shapes, tmp_path):
    cfg = load_config(write_config(tmp_path / "run.yaml", run_dict(shapes)))
    full = build_dataset(cfg.data.val, None, train=False, key="data.val")
    sub_cfg = val_subset(cfg.data.val, 3, tmp_path / "voc")
    sub = build_dataset(sub_cfg, None, train=False, key="data.val")
    assert [r.image_id for r in sub.records] == [r.image_id for r in full.records[:3]]
    for a, b in zip(sub.records, full.records[:3], strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert (shapes / "ImageSets" / "Main" / "val.txt").read_text().count("\n") == 8  # the data folder is unchanged
    assert val_subset(cfg.data.val, 0, tmp_path / "all") is cfg.data.val

    coco = cfg.data.val.__class__(
        format="coco", images=str(shapes / "JPEGImages"), annotations=str(shapes / "annotations" / "instances_val.json")
    )
    coco_full = build_dataset(coco, None, train=False, key="data.val")
    coco_sub = build_dataset(val_subset(coco, 2, tmp_path / "coco"), None, train=False, key="data.val")
    assert [r.image_id for r in coco_sub.records] == [r.image_id for r in coco_full.records[:2]]
    assert sum(len(r.boxes) for r in coco_sub.records) == sum(len(r.boxes) for r in coco_full.records[:2]) > 0


def test_missing_shapes_data_is_generated_and_other_missing_data_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bn_study_data, "STUDY_DATA", {"num_train": 6, "num_val": 2, "size": 64, "seed": 0})
    cfg = load_config(write_config(tmp_path / "run.yaml", run_dict(tmp_path / "made")))
    bn_study_data.ensure_study_data(cfg)
    assert (tmp_path / "made" / "ImageSets" / "Main" / "train.txt").read_text().split() == [
        f"train_{i:06d}" for i in range(6)
    ]

    other = run_dict(tmp_path / "absent")
    other["data"]["train"]["classes"] = ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match=f"data.train.root {tmp_path / 'absent'}: not found"):
        bn_study_data.ensure_study_data(load_config(write_config(tmp_path / "other.yaml", other)))
    assert not (tmp_path / "absent").exists()


# --- start weights --------------------------------------------------------------------------------------


def test_start_model_is_the_engines_initial_model(shapes, tmp_path, monkeypatch):
    """The 'start' histograms must show the weights the run really started from: capture the model
    the engine builds, before its first step, and compare."""
    built = []
    real_build = engine.build_ssd

    def build_ssd(model_cfg):
        model = real_build(model_cfg)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(engine, "build_ssd", build_ssd)
    cfg = load_config(write_config(tmp_path / "run.yaml", run_dict(shapes, seed=11, max_iter=1)))
    engine.train(cfg, tmp_path / "run")
    (initial,) = built
    torch.manual_seed(0)  # a different global RNG state before: start_model must reseed
    ours = start_model(cfg).state_dict()
    assert ours.keys() == initial.keys()
    assert all(torch.equal(ours[k], initial[k]) for k in initial)
    other = start_model(load_config(tmp_path / "run.yaml", ["train.seed=12"])).state_dict()
    assert not torch.equal(other["backbone.conv1.0.conv.weight"], initial["backbone.conv1.0.conv.weight"])


# --- the study ------------------------------------------------------------------------------------------


def png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_study_writes_plots_and_a_summary_per_variant(study):
    out, summary = study
    for name, min_size in (
        ("loss.png", (300, 500)),
        ("map.png", (300, 500)),
        ("activations.png", (300, 900)),
        ("lr_sweep.png", (300, 500)),
    ):
        pixels = png_pixels(out / name)
        assert pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1], name
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"

    saved = json.loads((out / "summary.json").read_text())
    assert saved["plots"] == {
        "loss": "loss.png",
        "map": "map.png",
        "activations": "activations.png",
        "lr_sweep": "lr_sweep.png",
    }
    assert [v["name"] for v in saved["variants"]] == ["none", "all@3x"]  # one curve per variant in each plot
    none, bn = saved["variants"]
    assert (none["batch_norm"], bn["batch_norm"]) == ([], list(BN_ALL))
    assert (none["lr"], bn["lr"]) == (pytest.approx(1e-3), pytest.approx(3e-3))
    assert (none["optimizer"], none["lr_mult"], bn["lr_mult"]) == ("adamw", 1.0, 3.0)
    assert saved["settings"]["optimizer"] == "adamw" and saved["settings"]["momentum"] is None
    for v in saved["variants"]:
        assert v["loss_curve"]["iter"] == [1, 2, 3, 4] and all(np.isfinite(v["loss_curve"]["loss"]))
        assert v["map_curve"]["iter"] == [2, 4] and v["final_map"] == v["map_curve"]["map"][-1]
        assert v["iterations"] == 4 and v["end_weights_iter"] == 4 and v["error"] is None and v["stopped"] == "done"
        assert v["diverged"] == (v["end_loss"] > v["start_loss"]) and v["skipped_steps"] == 0
        assert v["diverged_reason"] == ("loss rose" if v["diverged"] else None)
        assert v["images_per_s"] > 0
        assert list(v["activations"]) == LAYERS
        for cell in v["activations"].values():
            assert len(cell["edges"]) == HIST_BINS + 1 and set(cell) == {"edges", "start", "end"}
            width = cell["edges"][1] - cell["edges"][0]
            for phase in ("start", "end"):
                shown = sum(cell[phase]["density"]) * width  # the share of values inside the 0.5-99.5% range
                assert 0.9 < shown <= 1.0 + 1e-4
    # BN in train mode normalises every channel of the fixed batch: mean 0, std 1 before gamma/beta move
    # (the conf logits have no BN in these two variants: `all` leaves the heads out)
    for cell in (cell for layer, cell in bn["activations"].items() if layer != "conf.0"):
        assert cell["start"]["mean"] == pytest.approx(0.0, abs=0.02)
        assert cell["start"]["std"] == pytest.approx(1.0, abs=0.02)
    # without BN the scale is whatever the init gives: far from 1 in the deep layers
    assert none["activations"]["extras.0"]["start"]["std"] < 0.5

    best = max(v["best_map"] for v in saved["variants"])
    assert saved["study_best_map"] == best
    for v in saved["variants"]:
        hits = [it for it, m in zip(v["map_curve"]["iter"], v["map_curve"]["map"], strict=True) if m >= 0.9 * best]
        assert v["iters_to_90pct"] == (hits[0] if hits else None)

    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith(
        f"BN study of `{out.parent / 'run.yaml'}`: 4 iterations, batch 8, adamw, base lr 0.001, weight decay 0.0005"
    )
    assert table[2] == (
        "| variant | BN blocks | optimizer | lr | final mAP | best mAP "
        "| iterations to 90% of best | diverged | images/s |"
    )
    assert [row.split(" | ")[0] for row in table[4:]] == ["| none", "| all@3x"]
    assert table[5].startswith("| all@3x | all | adamw | 0.003 | ")


def test_every_variant_trains_the_same_data_and_seed(study):
    out, _ = study
    configs = {name: load_config(out / "runs" / name / "config.yaml") for name in ("none", "all_lr3x")}
    none, bn = configs["none"], configs["all_lr3x"]
    assert (none.model.batch_norm, bn.model.batch_norm) == ([], list(BN_ALL))
    assert none.train.seed == bn.train.seed == 3  # the study's override reaches every variant
    assert none.train.max_iter == bn.train.max_iter == 4
    # the config's time limit and time-driven schedule are lifted: variants compare at equal iterations
    assert none.train.time_limit is None and not none.train.schedule_by_time
    assert none.data == bn.data and len(build_dataset(none.data.val, None, train=False, key="data.val")) == 5
    none.model.batch_norm, none.train.lr = bn.model.batch_norm, bn.train.lr
    assert none == bn  # nothing else differs


def test_a_diverging_variant_is_recorded_not_raised(shapes, tmp_path):
    """A NaN L2Norm scale makes every loss non-finite: the engine stops with TrainingError before
    writing any checkpoint; the study records it, keeps the start histograms, and still plots."""
    cfg = load_config(
        write_config(tmp_path / "run.yaml", run_dict(shapes, max_bad_steps=2)), ["model.l2norm_scale=.nan"]
    )
    images = bn_study_data.fixed_batch(cfg, 4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"a previous study's")  # must not pass for this run's end weights
    os.utime(tmp_path / "run" / "last.pt", (time.time() - 3600, time.time() - 3600))
    res = run_variant(cfg, parse_variant("none"), tmp_path / "run", images)
    assert (
        res["diverged"] and "non-finite for 2 consecutive iterations" in res["error"] and res["stopped"] == "diverged"
    )
    assert res["diverged_reason"] == "non-finite loss, stopped"
    assert (res["iterations"], res["final_map"], res["end_weights_iter"], res["loss_curve"]["iter"]) == (
        0,
        None,
        None,
        [],
    )
    assert all(set(cell) == {"edges", "start"} for cell in res["activations"].values())

    res["loss_curve"] = {"iter": [5, 10, 15], "loss": [9.0, 3.0, 6.0]}  # as if a spike had come before the end
    summary = summarize(
        [res],
        {
            "config": "run.yaml",
            "iters": 2,
            "batch_size": 8,
            "optimizer": "adamw",
            "base_lr": 1e-3,
            "weight_decay": 0.0,
            "warmup_iters": 0,
            "seed": 0,
            "val_images": 5,
            "momentum": None,
        },
    )
    assert summary["study_best_map"] is None and res["iters_to_90pct"] is None
    assert bn_study_report.format_table(summary).splitlines()[-1] == (
        "| none | - | adamw | 0.001 | - | - | never | **yes** (non-finite loss, stopped) "
        "(loss rebounded 2.0x, iteration 15) | - |"
    )
    bn_study_report.write_plots(summary, tmp_path)
    assert png_pixels(tmp_path / "activations.png").shape[0] > 100


def test_an_sgd_sweep_records_a_diverging_lr_and_plots_final_map_against_lr(shapes, tmp_path):
    """--optimizer sgd --lr: every variant trains with SGD at the config's momentum; an absurd absolute lr
    makes the BN-free network's loss non-finite, which is recorded as diverged and the study goes on."""
    path = write_config(tmp_path / "run.yaml", run_dict(shapes, max_bad_steps=2))
    out = tmp_path / "out"
    summary = run_study(
        path,
        out,
        ["train.momentum=0.8"],
        ["all+heads", "none@lr1e4"],
        iters=4,
        eval_period=4,
        log_period=1,
        val_images=3,
        act_images=4,
        optimizer="sgd",
        lr=0.02,
    )
    heads, none = summary["variants"]
    cfg = load_config(out / "runs" / "all+heads" / "config.yaml")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.momentum, cfg.model.batch_norm) == (
        "sgd",
        0.02,
        0.8,
        list(BN_BLOCKS),
    )
    assert load_config(out / "runs" / "none_lr1e4" / "config.yaml").train.lr == 1e4
    assert (summary["settings"]["optimizer"], summary["settings"]["base_lr"], summary["settings"]["momentum"]) == (
        "sgd",
        0.02,
        0.8,
    )

    assert (heads["optimizer"], heads["lr"], heads["error"], heads["skipped_steps"], heads["iterations"]) == (
        "sgd",
        0.02,
        None,
        0,
        4,
    )
    assert heads["final_map"] is not None and heads["stopped"] == "done"
    # with head BN the first conf head's logits start normalised too
    assert heads["activations"]["conf.0"]["start"]["mean"] == pytest.approx(0.0, abs=0.02)
    assert heads["activations"]["conf.0"]["start"]["std"] == pytest.approx(1.0, abs=0.02)

    assert (none["optimizer"], none["lr"], none["lr_mult"], none["stopped"]) == ("sgd", 1e4, None, "diverged")
    assert (
        none["diverged"]
        and none["diverged_reason"] == "non-finite loss, stopped"
        and "non-finite for 2" in none["error"]
    )
    assert none["final_map"] is None and bn_study_report.sweep_map(none) == 0.0
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith(f"BN study of `{path}`: 4 iterations, batch 8, sgd (momentum 0.8), base lr 0.02,")
    assert table[-1].startswith("| none@lr1e4 | - | sgd | 10000 | - | - | never | **yes** (non-finite loss, stopped)")
    assert table[-2].startswith("| all+heads | all+heads | sgd | 0.02 | ")
    pixels = png_pixels(out / "lr_sweep.png")
    assert pixels.shape[:2] == (450, 1100) and pixels[..., :3].std() > 0.05


def test_script_reports_bad_arguments_in_one_line(shapes, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bn_study_script", ROOT / "scripts" / "bn_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = write_config(tmp_path / "run.yaml", run_dict(shapes))
    assert script.main([str(path), "--out", str(tmp_path / "out"), "--variants", "none", "bn@3x"]) == 2
    assert capsys.readouterr().err.startswith("bn_study.py: error: variant 'bn@3x': unknown BN block 'bn'")
    # overrides after --variants
    assert script.main([str(path), "--variants", "none", "train.lr=0.1", "model.widht=1"]) == 2
    assert "unknown config key 'model.widht' (did you mean model.width?)" in capsys.readouterr().err
    assert script.build_parser().parse_args([str(path)]).optimizer == "sgd"
    assert script.main([str(path), "--variants", "none", "--lr", "0"]) == 2
    assert capsys.readouterr().err.startswith("bn_study.py: error: --lr must be a positive number, got 0.0")


def test_ctrl_c_stops_the_whole_study(shapes, tmp_path):
    """The engine turns SIGINT into "save last.pt and return"; the study must not go on to the next
    variant as if the interrupted one had finished."""
    path = write_config(tmp_path / "run.yaml", run_dict(shapes))
    out = tmp_path / "out"
    env = {**os.environ, "SSD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "bn_study.py"),
            str(path),
            "--out",
            str(out),
            "--iters",
            "500",
            "--variants",
            "none",
            "all",
            "--val-images",
            "2",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "runs" / "none" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the first variant never logged an iteration"
            time.sleep(0.05)
    except AssertionError:
        proc.kill()  # a failed wait must not leave the study training in the background
        proc.communicate()
        raise
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert (
        f"bn_study.py: interrupted: variant none interrupted; its state is in {out / 'runs' / 'none' / 'last.pt'}"
        in err
    )
    assert (out / "runs" / "none" / "last.pt").is_file()
    assert not (out / "runs" / "all").exists() and not (out / "summary.json").exists()
