"""train.ema: the average's arithmetic and warmup against hand computations, checkpoints whose default
weights are the average (ssd eval, Detector, --weights-kind raw), old checkpoints, and exact resume.

The training runs are test_train.py's: a width-1/8 SSD at 64 px on 40 shapes images, batch 8, 12
iterations with evaluations at 6 and 12, one CPU thread (about 5 s a run).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from test_train import MAX_ITER, SIZE, run_dict
from torch import nn

import ssd.engine.train as engine
from ssd.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint, make_checkpoint, model_from_checkpoint
from ssd.cli import main
from ssd.config import Config, ConfigError, from_dict
from ssd.engine.ema import ModelEma, ema_decay
from ssd.engine.optim import build_optimizer
from ssd.engine.train import train
from ssd.inference import Detector

DECAY = 0.9  # reached by the warmup at update 80: within 12 updates the warmup alone decides

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the average ------------------------------------------------------------------------------------


def test_warmup_follows_tensorflows_num_updates_rule():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 890) == pytest.approx(0.99)  # 891 / 900
    assert ema_decay(0.999, 8990) == pytest.approx(0.999)  # 8991 / 9000: the cap from here on
    assert ema_decay(0.999, 100_000) == 0.999
    assert ema_decay(0.9, 79) == pytest.approx(80 / 89) and ema_decay(0.9, 80) == 0.9


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_update_is_the_hand_computed_average_of_weights_and_bn_statistics():
    net = tiny_net()
    ema = ModelEma(net, decay=0.5)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    history = []
    for _ in range(3):  # three steps of "training": new weights, BN statistics moved by a forward
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(2, 3, 6, 6))
        history.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update(net)
    assert ema.updates == 3
    decays = [0.1, 2 / 11, 0.25]  # min(0.5, (1 + n) / (10 + n)) for n = 0, 1, 2
    assert [ema_decay(0.5, n) for n in range(3)] == pytest.approx(decays)
    for key, value in ema.state_dict().items():
        if key.endswith("num_batches_tracked"):  # integer buffers are copied
            assert value.item() == history[-1][key].item() == 3
            continue
        expected = start[key].double()
        for d, weights in zip(decays, history, strict=True):
            expected = d * expected + (1 - d) * weights[key].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=key)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_unchanged_tensors_stay_bitwise_and_the_memory_format_is_kept():
    net = tiny_net().to(memory_format=torch.channels_last)
    net[0].weight.requires_grad_(False)  # e.g. a frozen block: its weights never change
    ema = ModelEma(net, decay=0.999)
    with torch.no_grad():
        net[3].weight.add_(1.0)
    for _ in range(5):
        ema.update(net)
    assert torch.equal(ema.module[0].weight, net[0].weight)  # lerp(a, a, w) == a exactly
    assert ema.module[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(ema.module[3].weight, net[3].weight)


def test_train_ema_must_be_a_decay_in_the_open_unit_interval():
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"train\.ema must be a decay in \(0, 1\)"):
            from_dict(Config, {"train": {"ema": bad}})
    assert from_dict(Config, {"train": {"ema": 0.999}}).train.ema == 0.999
    assert from_dict(Config, {}).train.ema is None


# --- old checkpoints ---------------------------------------------------------------------------------


def test_a_checkpoint_without_ema_loads_its_weights_for_every_default(make_tiny_config, tmp_path):
    from ssd.checkpoint import save_checkpoint
    from ssd.model import build_ssd

    cfg = make_tiny_config(num_classes=3)
    model = build_ssd(cfg)
    save_checkpoint(make_checkpoint(model.state_dict(), cfg, ["a", "b"], "train"), tmp_path / "old.pt")
    for kind in (None, "raw"):
        loaded, ckpt = model_from_checkpoint(tmp_path / "old.pt", kind)
        assert "eval_weights" not in ckpt
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"old.pt: holds no EMA weights \(trained without train.ema\)"):
        model_from_checkpoint(tmp_path / "old.pt", "ema")
    with pytest.raises(ValueError, match="weights kind must be ema or raw"):
        checkpoint_weights(ckpt, "average")


# --- training runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    """40 train + 10 val images at 64 px. Read only."""
    return shapes_data(40, 10, SIZE, 3)


def config(root: Path, **train_options) -> Config:
    return from_dict(Config, run_dict(root, **train_options))  # test_train's tiny run


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_once(out: Path, cfg: Config) -> tuple[Path, dict]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(out / "cache"))
        return out / "run", train(cfg, out / "run")


@pytest.fixture(scope="module")
def ema_run(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run with train.ema. Read only."""
    return run_once(tmp_path_factory.mktemp("ema"), config(shapes, ema=DECAY))


@pytest.fixture(scope="module")
def plain_run(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """The same run without train.ema. Read only."""
    return run_once(tmp_path_factory.mktemp("plain"), config(shapes))


def eval_map(out: Path, weights: str, tmp_path: Path, *options: str) -> float:
    json_path = tmp_path / "m.json"
    assert (
        main(["eval", str(out / "config.yaml"), "--weights", str(out / weights), "--json", str(json_path), *options])
        == 0
    )
    return json.loads(json_path.read_text())["map"]


def test_ema_leaves_the_training_alone_and_logs_both_maps(ema_run, plain_run):
    out, summary = ema_run
    plain, _ = plain_run
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(plain) if "loss" in r], rel=1e-6)
    evals, plain_evals = [r for r in read_metrics(out) if "map" in r], [r for r in read_metrics(plain) if "map" in r]
    assert [r["iter"] for r in evals] == [6, 12]
    for row, plain_row in zip(evals, plain_evals, strict=True):
        assert row["weights"] == "ema" and row["map"] == row["map_ema"]
        assert row["map_raw"] == pytest.approx(plain_row["map"], abs=1e-6)  # the raw weights are the plain run's
        assert row["per_class_raw"] == pytest.approx(plain_row["per_class"], abs=1e-6)
    best = max(evals, key=lambda r: r["map"])  # best.pt follows the EMA weights' mAP
    assert (summary["best_map"], summary["best_iter"]) == (best["map"], best["iter"])

    last = load_checkpoint(out / "last.pt")
    assert (last["eval_weights"], last["ema_updates"], last["iteration"]) == ("ema", MAX_ITER, MAX_ITER)
    for key, value in load_checkpoint(plain / "last.pt")["model"].items():
        torch.testing.assert_close(last["model_raw"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert any(not torch.equal(last["model"][k], v) for k, v in last["model_raw"].items() if v.is_floating_point())
    best_ckpt = load_checkpoint(out / "best.pt")
    assert (best_ckpt["eval_weights"], best_ckpt["iteration"], best_ckpt["map"]) == ("ema", best["iter"], best["map"])
    assert best_ckpt["map_raw"] == best["map_raw"] and best_ckpt["ema_updates"] == best["iter"]


def test_ssd_eval_scores_the_ema_weights_by_default_and_the_raw_ones_on_request(ema_run, tmp_path):
    out, _ = ema_run
    final = [r for r in read_metrics(out) if "map" in r][-1]
    assert final["map_ema"] != final["map_raw"]  # the two differ here, so the test can tell them apart
    assert eval_map(out, "last.pt", tmp_path) == pytest.approx(final["map_ema"], abs=1e-6)
    assert eval_map(out, "last.pt", tmp_path, "--weights-kind", "ema") == pytest.approx(final["map_ema"], abs=1e-6)
    assert eval_map(out, "last.pt", tmp_path, "--weights-kind", "raw") == pytest.approx(final["map_raw"], abs=1e-6)


def test_detector_loads_the_ema_weights_by_default_and_the_raw_ones_on_request(ema_run):
    out, _ = ema_run
    ckpt = load_checkpoint(out / "best.pt")
    for kind, key in ((None, "model"), ("ema", "model"), ("raw", "model_raw")):
        det = Detector.from_checkpoint(out / "best.pt", device="cpu", fuse=False, weights_kind=kind)
        for name, value in det.model.state_dict().items():
            assert torch.equal(value, ckpt[key][name]), (kind, name)


def test_resume_restores_the_average_and_its_update_count_exactly(shapes, ema_run, tmp_path, caplog):
    """Stopped by SIGINT after iteration 5 (last.pt saved then), resumed: the same evaluations of both
    weights and the same average, raw weights and update count as the uninterrupted run."""
    real_build_loss, calls = engine.build_loss, []

    def build_loss(loss_cfg, model_cfg):
        criterion = real_build_loss(loss_cfg, model_cfg)

        def interrupt_at_5(*args):
            calls.append(None)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGINT)
            return criterion(*args)

        return interrupt_at_5

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "build_loss", build_loss)
        summary = train(config(shapes, ema=DECAY), out)
    assert (summary["stopped"], summary["iteration"]) == ("signal", 5)
    assert load_checkpoint(out / "last.pt")["ema_updates"] == 5
    with caplog.at_level(logging.WARNING, logger="ssd.train"):
        assert train(config(shapes, ema=DECAY), out, resume=True)["iteration"] == MAX_ITER
    assert not [m for m in caplog.messages if "EMA" in m]

    reference, _ = ema_run
    ref_evals, evals = [r for r in read_metrics(reference) if "map" in r], [r for r in read_metrics(out) if "map" in r]
    for key in ("map", "map_ema", "map_raw"):
        assert [r[key] for r in evals] == pytest.approx([r[key] for r in ref_evals], abs=1e-6), key
    ref_ckpt, ckpt = load_checkpoint(reference / "last.pt"), load_checkpoint(out / "last.pt")
    assert ckpt["ema_updates"] == ref_ckpt["ema_updates"] == MAX_ITER
    for entry in ("model", "model_raw"):
        for key, value in ref_ckpt[entry].items():
            torch.testing.assert_close(ckpt[entry][key], value, rtol=1e-5, atol=1e-7, msg=f"{entry} {key}")


def test_resuming_across_the_ema_setting_keeps_the_raw_weights(shapes, plain_run, ema_run, tmp_path, caplog):
    """A last.pt without an average resumed with train.ema starts one from its weights; one with an
    average resumed without train.ema goes on from its raw weights (not the average)."""
    from ssd.engine.checkpoints import restore_state
    from ssd.model import build_ssd

    cfg = config(shapes, ema=DECAY)
    for source, ema_on in ((plain_run[0], True), (ema_run[0], False)):
        ckpt = load_checkpoint(source / "last.pt")
        model = build_ssd(cfg.model)
        optimizer = build_optimizer(cfg.train, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        ema = ModelEma(build_ssd(cfg.model), DECAY) if ema_on else None
        with caplog.at_level(logging.WARNING, logger="ssd.train"):
            restore_state(ckpt, source / "last.pt", model, optimizer, scheduler, scaler, torch.device("cpu"), 0, ema)
        for key, value in checkpoint_weights(ckpt, "raw").items():
            assert torch.equal(model.state_dict()[key], value), key
        if ema_on:
            assert ema.updates == 0 and all(torch.equal(ema.state_dict()[k], v) for k, v in model.state_dict().items())
    assert any("has no EMA of the weights" in m for m in caplog.messages)
    assert any("holds an EMA of the weights, but train.ema is off" in m for m in caplog.messages)


def test_the_update_reads_nothing_back_from_the_device(monkeypatch):
    """No host-device synchronisation in a step: the update count and the decay live on the host."""
    net = tiny_net()
    ema = ModelEma(net, decay=0.999)

    def sync(*args, **kwargs):
        raise AssertionError("the EMA update read a device value")

    for name in ("item", "tolist", "__bool__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for _ in range(3):
        ema.update(net)
    monkeypatch.undo()
    assert ema.updates == 3


def test_export_writes_the_ema_weights_by_default_and_the_raw_ones_on_request(ema_run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out, _ = ema_run
    x = torch.randint(0, 256, (1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)).float()  # static batch 1
    scores = {}
    for kind in (None, "ema", "raw"):
        onnx_path = tmp_path / f"{kind}.onnx"
        assert (
            main(
                [
                    "export",
                    "--weights",
                    str(out / "last.pt"),
                    "--out",
                    str(onnx_path),
                    *(["--weights-kind", kind] if kind else []),
                ]
            )
            == 0
        )
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        scores[kind] = session.run(None, {"images": x.numpy()})[1]
    assert (scores[None] == scores["ema"]).all()
    assert abs(scores["ema"] - scores["raw"]).max() > 1e-3  # the two weights give other scores
