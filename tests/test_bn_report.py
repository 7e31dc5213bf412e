"""``ssd bn-report`` (ssd.engine.bn.bn_report): running vs batch statistics per BN layer, the train/eval
gap, and the flags, on a real tiny BN model trained a few iterations through the engine.

The model is a width-1/8 SSD at 64 px with BN everywhere (19 layers) on 40 shapes images, batch 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssd.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import load_config
from ssd.data.dataset import build_dataset
from ssd.data.loader import build_dataloader
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.data.transforms import build_transforms, normalize_batch
from ssd.engine import bn as bn_tools
from ssd.engine.train import train
from ssd.loss import build_loss
from ssd.model import build_ssd

SIZE = 64
NUM_BN = 19
BATCHES = 3


def run_dict(root: Path, **model_options) -> dict:
    dataset = {"format": "voc", "root": str(root), "classes": SHAPES_CLASSES}
    return {
        "model": {"num_classes": 5, "input_size": SIZE, "width": 0.125, "batch_norm": "all", "dropout": 0.0,
                  "extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}], **model_options},
        "data": {"train": {**dataset, "split": "train"}, "val": {**dataset, "split": "val"}, "num_workers": 0},
        "train": {"max_iter": 4, "batch_size": 8, "optimizer": "adamw", "lr": 3e-3, "warmup_iters": 0, "device": "cpu",
                  "checkpoint_period": 100, "eval_period": 100, "log_period": 1, "seed": 1, "tensorboard": False},
        "eval": {"batch_size": 10},
    }  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Shapes data, the YAML config, and a run trained 4 iterations (last.pt). Read only."""
    tmp = tmp_path_factory.mktemp("bn_report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(tmp / "cache"))
        generate_shapes(tmp / "shapes", 40, 10, size=SIZE, seed=5)
        config = tmp / "run.yaml"
        config.write_text(yaml.safe_dump(run_dict(tmp / "shapes"), sort_keys=False))
        train(load_config(config), tmp / "run")
    return {"config": config, "last": tmp / "run" / "last.pt", "tmp": tmp}


def report_inputs(config: Path):
    """The command's batches (train transforms of data.train, seed and batch of the config) and helpers."""
    cfg = load_config(config)
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, SIZE, train=True)
    dataset = build_dataset(cfg.data.train, transform, train=True)

    def loader():
        return build_dataloader(dataset, cfg.train.batch_size, train=True, num_workers=0, seed=cfg.train.seed)

    def prepare(batch):
        return normalize_batch(batch["images"], cfg.model.preprocess), batch["boxes"], batch["labels"]

    return cfg, loader, prepare, build_loss(cfg.loss, cfg.model)


def trained_model(setup) -> torch.nn.Module:
    model, _ = model_from_checkpoint(setup["last"])
    return model


def with_precise_bn(setup) -> torch.nn.Module:
    """The trained model with population statistics over the same batches the report measures."""
    model = trained_model(setup)
    cfg, loader, prepare, _ = report_inputs(setup["config"])
    used = bn_tools.precise_bn(model, loader(), lambda m, batch: m(prepare(batch)[0]), BATCHES)
    assert used == BATCHES
    return model


def test_after_precise_bn_the_running_statistics_match_the_batches(setup):
    model = with_precise_bn(setup)
    cfg, loader, prepare, criterion = report_inputs(setup["config"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_tools.set_train_mode(model, "frozen")  # a mixed state: the model in train mode, its BN layers in eval mode
    modes = [m.training for m in model.modules()]
    report = bn_tools.bn_report(model, loader(), prepare, criterion, BATCHES)

    assert (report.batches, report.images) == (BATCHES, BATCHES * 8)
    assert [r.name for r in report.layers] == [name for name, _ in bn_tools.bn_layers(model)] and len(report.layers) == NUM_BN
    for r in report.layers:
        assert r.mean_gap < 1e-4 and r.var_gap < 1e-4, r  # the same population statistics, float32 vs float64
        assert r.running_mean == pytest.approx(r.batch_mean, abs=1e-4) and r.running_var == pytest.approx(r.batch_var, rel=1e-4)
        assert not r.stale and not r.drifted
    assert report.flagged == []
    # the model is left exactly as it was: weights, running statistics, counters and every module's mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert model.training and not any(m.training for _, m in bn_tools.bn_layers(model))

    # Eval mode still differs from train mode: it normalises with statistics pooled over the 3 batches,
    # train mode with each batch's own (8 images; the 1x1 extra sees 8 values per channel). But far
    # less than with the running statistics training left after 4 steps, or with none at all.
    trained = bn_tools.bn_report(trained_model(setup), loader(), prepare, criterion, BATCHES)
    torch.manual_seed(0)
    fresh = bn_tools.bn_report(build_ssd(cfg.model), loader(), prepare, criterion, BATCHES)
    assert 0 < report.conf_gap < trained.conf_gap < fresh.conf_gap
    assert 0 < report.loc_gap < trained.loc_gap < fresh.loc_gap
    assert trained.loss_train == report.loss_train  # same weights, batch statistics: the same network
    assert abs(report.loss_eval / report.loss_train - 1) < abs(trained.loss_eval / trained.loss_train - 1)


def test_running_statistics_lagging_after_a_short_training_are_flagged_drifted(setup):
    """After 4 steps with momentum 0.1 the running statistics are still 0.9^4 = 66% their initial
    values: the classic "good in training, bad at test" state, flagged without being stale."""
    cfg, loader, prepare, criterion = report_inputs(setup["config"])
    model = trained_model(setup)
    assert all(int(m.num_batches_tracked) == 4 for _, m in bn_tools.bn_layers(model))
    report = bn_tools.bn_report(model, loader(), prepare, criterion, BATCHES)
    assert not any(r.stale for r in report.layers)
    assert len(report.flagged) >= NUM_BN // 2
    for r in report.layers:
        assert r.drifted == (r.mean_gap > bn_tools.DRIFT_MEAN_GAP or r.var_gap > bn_tools.DRIFT_VAR_GAP)
        # what is left of the initial (0, 1): the running mean is ~(1 - 0.9^4) of the way to the batch mean
        assert abs(r.running_mean) <= abs(r.batch_mean) + 0.05
    assert report.loss_eval > report.loss_train


def test_never_updated_statistics_are_flagged_stale_and_break_eval_mode(setup):
    torch.manual_seed(0)
    model = build_ssd(load_config(setup["config"]).model)  # fresh: running mean 0, var 1 everywhere
    cfg, loader, prepare, criterion = report_inputs(setup["config"])
    report = bn_tools.bn_report(model, loader(), prepare, criterion, 2)
    assert [r.stale for r in report.layers] == [True] * NUM_BN and len(report.flagged) == NUM_BN
    first = report.layers[0]
    assert (first.running_mean, first.running_var) == (0.0, 1.0)
    # conv1_1 sees the normalised image: batch variance ~ 1 per channel, yet far from 0/1 in places
    assert first.mean_gap > 0.1
    assert report.conf_gap > 0.5  # eval mode is a different network
    text = bn_tools.format_bn_report(report)
    assert f"FLAGGED {NUM_BN} of {NUM_BN} layers: {NUM_BN} stale, 0 drifted (e.g. backbone.conv1.0.bn)" in text
    assert text.count("STALE (never updated)") == NUM_BN


def test_drifted_layers_are_flagged_with_the_gap_in_batch_standard_deviations(setup):
    model = with_precise_bn(setup)
    cfg, loader, prepare, criterion = report_inputs(setup["config"])
    layers = dict(bn_tools.bn_layers(model))
    shifted, scaled = layers["backbone.conv3.1.bn"], layers["extras.0.1.bn"]
    with torch.no_grad():
        shifted.running_mean += 2.0 * (shifted.running_var + shifted.eps).sqrt()  # 2 standard deviations off
        scaled.running_var.mul_(4.0)
    report = bn_tools.bn_report(model, loader(), prepare, criterion, BATCHES)
    by_name = {r.name: r for r in report.layers}
    assert by_name["backbone.conv3.1.bn"].mean_gap == pytest.approx(2.0, rel=1e-3)
    assert by_name["extras.0.1.bn"].var_gap == pytest.approx(3.0, rel=1e-3)  # max(r, 1/r) - 1 with r = 4
    assert [r.name for r in report.flagged] == ["backbone.conv3.1.bn", "extras.0.1.bn"]
    assert all(r.drifted and not r.stale for r in report.flagged)
    assert report.loss_eval > report.loss_train


def test_command_prints_the_table_and_exits_1_only_when_a_layer_is_flagged(setup, tmp_path, capsys):
    good = with_precise_bn(setup)
    classes = load_checkpoint(setup["last"])["classes"]
    model_cfg = load_config(setup["config"]).model
    save_checkpoint(make_checkpoint(good.state_dict(), model_cfg, classes, "train"), tmp_path / "precise.pt")
    args = ["--config", str(setup["config"]), "--batches", str(BATCHES), "--device", "cpu"]
    assert main(["bn-report", "--weights", str(tmp_path / "precise.pt"), *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"BatchNorm report for {tmp_path / 'precise.pt'}: {NUM_BN} layers, data.train of {setup['config']}"
    assert out[1].split() == ["layer", "ch", "run", "mean", "batch", "mean", "run", "var", "batch", "var", "mean", "gap",
                              "var", "gap", "status"]  # fmt: skip
    rows = out[2 : 2 + NUM_BN]
    assert [row.split()[0] for row in rows] == [name for name, _ in bn_tools.bn_layers(good)]
    assert all(row.split()[-1] == "ok" and float(row.split()[-3]) < 1e-3 for row in rows)
    assert out[-2].startswith(f"train vs eval mode on the same {BATCHES * 8} images ({BATCHES} batches): loss ")
    assert out[-1] == f"all {NUM_BN} BatchNorm layers ok"

    torch.manual_seed(0)
    save_checkpoint(make_checkpoint(build_ssd(model_cfg).state_dict(), model_cfg, classes, "train"), tmp_path / "fresh.pt")
    assert main(["bn-report", "--weights", str(tmp_path / "fresh.pt"), *args, "data.train.split=val"]) == 1  # overrides work
    assert "STALE (never updated)" in capsys.readouterr().out


def test_command_errors_are_one_line(setup, tmp_path, capsys):
    cfg = load_config(setup["config"], ["model.batch_norm=none"])
    torch.manual_seed(0)
    save_checkpoint(make_checkpoint(build_ssd(cfg.model).state_dict(), cfg.model, SHAPES_CLASSES, "train"), tmp_path / "plain.pt")
    args = ["--config", str(setup["config"]), "--device", "cpu"]
    assert main(["bn-report", "--weights", str(tmp_path / "plain.pt"), *args]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ssd bn-report: error: {tmp_path / 'plain.pt'}: the model has no BatchNorm layers (model.batch_norm: none); nothing to report"
    )
    assert main(["bn-report", "--weights", str(setup["last"]), *args, "--batches", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ssd bn-report: error: --batches must be >= 1, got 0"
    assert main(["bn-report", "--weights", str(tmp_path / "missing.pt"), *args]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
