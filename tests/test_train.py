"""ssd.engine.train through real runs on the shapes dataset: outputs, learning, resume after
SIGKILL / SIGTERM / SIGINT matching an uninterrupted run, corrupt checkpoints, non-finite losses,
and fine-tuning onto another class count.

Every run is a width-1/8 SSD at 64 px (feature maps 8, 4, 2, 1; 372 priors) on 40 training images,
batch 8 (5 iterations per epoch), one CPU thread: about 0.1 s per iteration. In-process runs call
:func:`ssd.engine.train.train`; the real ``ssd train`` process is used only where exit codes and
signals matter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_dict
from torch.utils.data import DataLoader

import ssd.engine.train as engine
from ssd.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import Config, ConfigError, from_dict, load_config
from ssd.data.dataset import build_dataset
from ssd.data.loader import EpochIndexSampler
from ssd.data.shapes import SHAPES_CLASSES
from ssd.engine.finetune import init_weights_from
from ssd.engine.optim import lr_factor
from ssd.engine.step import TrainingError
from ssd.engine.train import train
from ssd.model import build_ssd

SIZE = 64
MAX_ITER = 12


def run_dict(root: Path, **train_options) -> dict:
    """A tiny run: 64 px input, so conv4_3 is 8x8, fc7 4x4 and two stride-2 extras give 2x2 and 1x1."""
    options = {"max_iter": MAX_ITER, "optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup_iters": 2}
    return tiny_run_dict(root, **{**options, "checkpoint_period": 3, "eval_period": 6, **train_options})


def config(root: Path, **train_options) -> Config:
    return from_dict(Config, run_dict(root, **train_options))


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def loss_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "loss" in r]


def last_logged_iter(out: Path) -> int:
    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max((r["iter"] for r in rows if "loss" in r), default=0)


def assert_same_run(reference: Path, out: Path) -> None:
    """Same loss trajectory (every iteration logged), same evaluations, same final weights."""
    ref_rows, rows = loss_rows(reference), loss_rows(out)
    assert [r["iter"] for r in rows] == [r["iter"] for r in ref_rows] == list(range(1, MAX_ITER + 1))
    for ref, row in zip(ref_rows, rows, strict=True):
        for key in ("loss", "loc", "conf", "lr"):
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-12), (row["iter"], key)
    ref_evals, evals = [r for r in read_metrics(reference) if "map" in r], [r for r in read_metrics(out) if "map" in r]
    assert [r["iter"] for r in evals] == [r["iter"] for r in ref_evals] == [6, 12]
    assert [r["map"] for r in evals] == pytest.approx([r["map"] for r in ref_evals], abs=1e-6)
    ref_ckpt, ckpt = load_checkpoint(reference / "last.pt"), load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == MAX_ITER and ckpt["best"] == pytest.approx(ref_ckpt["best"])
    for key, value in ref_ckpt["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def subprocess_env(tmp_path: Path) -> dict:
    return {**os.environ, "SSD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_cli(args: list[str], tmp_path: Path, log_name: str) -> subprocess.Popen:
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "ssd", "train", *args],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for_iteration(proc: subprocess.Popen, out: Path, iteration: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = last_logged_iter(out)
        if reached >= iteration:
            return reached
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no iteration {iteration} after {timeout} s")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    """40 train + 10 val images at 64 px. Read only."""
    return shapes_data(40, 10, SIZE, 3)


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted in-process run of MAX_ITER iterations (evaluations at 6 and 12). Read only."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(out / "cache"))
        summary = train(config(shapes), out / "run")
    return out / "run", summary


# --- the training sample (eval.train_sample) ------------------------------------------------------------


def without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in keys} for row in rows]


def test_the_training_sample_changes_nothing_else_and_scores_as_eval_split_train(shapes, reference, tmp_path, capsys):
    """The reference run scores all 40 training images at each evaluation (the default 200 > 40): its
    train_sample_map is what ``ssd eval --split train`` gives last.pt, and a run without the sample
    logs every other value exactly as it did."""
    out, _ = reference
    evals = [r for r in read_metrics(out) if "map" in r]
    assert [r["iter"] for r in evals] == [6, 12] and all(0.0 <= r["train_sample_map"] <= 1.0 for r in evals)
    args = ["eval", str(out / "config.yaml"), "--weights", str(out / "last.pt"), "--split", "train"]
    assert main([*args, "--json", str(tmp_path / "train.json")]) == 0
    assert json.loads((tmp_path / "train.json").read_text())["map"] == pytest.approx(
        evals[-1]["train_sample_map"], abs=1e-6
    )
    # mAP@[.50:.95] beside VOC07 on this VOC-layout data: COCO's AP of the same weights on data.val
    assert main([*args[:-2], "--metric", "coco", "--json", str(tmp_path / "coco.json")]) == 0
    coco_ap = json.loads((tmp_path / "coco.json").read_text())["map"]
    assert 0.0 <= coco_ap == pytest.approx(evals[-1]["map_50_95"], abs=1e-6)

    data = run_dict(shapes)
    data["eval"]["train_sample"] = 0
    train(from_dict(Config, data), tmp_path / "off")
    timings = ("time", "images_per_s")
    assert without(read_metrics(tmp_path / "off"), *timings) == without(read_metrics(out), *timings, "train_sample_map")


def test_the_evaluation_log_line_and_row_carry_the_training_sample(shapes, tmp_path, caplog):
    from ssd.engine.distributed import DistContext
    from ssd.engine.monitor import TrainLog

    cfg = config(shapes, tensorboard=False)
    log = TrainLog(cfg.train, DistContext(), tmp_path, 0, append=False, cpu=True)
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        log.eval_row(6, {"map": 0.25, "metric": "voc07", "per_class": {"circle": 0.25}, "train_sample_map": 0.75})
        log.eval_row(12, {"map": 0.5, "metric": "voc07", "per_class": {"circle": 0.5}})
    log.close()
    assert caplog.messages == ["iter 6: voc07 mAP 0.2500; training sample 0.7500", "iter 12: voc07 mAP 0.5000"]
    first, second = read_metrics(tmp_path)
    assert (first["map"], first["train_sample_map"]) == (0.25, 0.75) and "train_sample_map" not in second


def test_the_training_sample_is_fixed_and_leaves_the_global_random_state_alone(shapes):
    from ssd.engine.train_eval import build_train_sample

    cfg = config(shapes)
    cfg.eval.train_sample = 5
    train_set = build_dataset(cfg.data.train, None, train=True)
    state = torch.get_rng_state()
    first = build_train_sample(train_set, cfg, num_workers=0, pin_memory=False)
    batches = list(first.loader)
    assert torch.equal(torch.get_rng_state(), state)  # drawing, building and reading the sample took nothing from it
    again = build_train_sample(train_set, cfg, num_workers=0, pin_memory=False)
    ids = [r.image_id for r in first.dataset.records]
    assert len(ids) == 5 and ids == sorted(ids) and ids == [r.image_id for r in again.dataset.records]
    assert sum(len(b["image_ids"]) for b in batches) == 5 and first.dataset.train is False  # evaluation transforms
    cfg.eval.train_sample = 0
    assert build_train_sample(train_set, cfg, num_workers=0, pin_memory=False) is None
    with pytest.raises(ConfigError, match="eval.train_sample must be >= 0"):
        from_dict(Config, {**run_dict(shapes), "eval": {"train_sample": -1}})


def patch_loss(monkeypatch, edit) -> list:
    """Wrap the engine's loss; ``edit(call, losses)`` may change the terms of the call-th loss
    evaluation (1-based; skipped steps count too). Returns the list of models the engine built."""
    real_build_loss, real_build_ssd, models, calls = engine.build_loss, engine.build_ssd, [], []

    def build_ssd(model_cfg):
        models.append(real_build_ssd(model_cfg))
        return models[-1]

    def build_loss(loss_cfg, model_cfg):
        criterion = real_build_loss(loss_cfg, model_cfg)

        def edited(*args):
            calls.append(None)
            losses = criterion(*args)
            edit(len(calls), losses)
            return losses

        return edited

    monkeypatch.setattr(engine, "build_ssd", build_ssd)
    monkeypatch.setattr(engine, "build_loss", build_loss)
    return models


# --- a real run ---------------------------------------------------------------------------------


def test_short_run_writes_its_outputs_and_learns(shapes, reference):
    out, summary = reference
    assert summary["stopped"] == "done" and summary["iteration"] == MAX_ITER
    assert load_config(out / "config.yaml") == config(shapes)  # the resolved config, every default filled in

    rows = loss_rows(out)
    assert [r["iter"] for r in rows] == list(range(1, MAX_ITER + 1))
    assert all(r["loss"] == pytest.approx(r["loc"] + r["conf"], rel=1e-6) for r in rows)
    first, last = [r["loss"] for r in rows[:3]], [r["loss"] for r in rows[-3:]]
    assert sum(last) < 0.75 * sum(first), (first, last)  # it learns: the loss falls by a quarter in 12 steps
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 at max_iter

    evals = [r for r in read_metrics(out) if "map" in r]
    assert [r["iter"] for r in evals] == [6, 12] and set(evals[0]["per_class"]) == set(SHAPES_CLASSES)
    best = max(evals, key=lambda r: r["map"])
    assert (summary["best_map"], summary["best_iter"]) == (best["map"], best["iter"])

    last = load_checkpoint(out / "last.pt")
    assert last["iteration"] == MAX_ITER and last["classes"] == SHAPES_CLASSES
    assert last["best"] == {"map": best["map"], "iter": best["iter"]}  # includes the evaluation at the same iteration
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    best_ckpt = load_checkpoint(out / "best.pt")
    assert (best_ckpt["iteration"], best_ckpt["map"]) == (best["iter"], best["map"])
    model, _ = model_from_checkpoint(out / "best.pt")  # a detector that predicts on its own
    assert model.eval()(torch.zeros(1, 3, SIZE, SIZE))["conf"].shape == (1, 372, 5)
    assert not list(out.glob(".*.tmp"))


def test_tensorboard_gets_the_logged_scalars_and_drawn_validation_images(reference):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = reference
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    rows, evals = loss_rows(out), [r for r in read_metrics(out) if "map" in r]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["iter"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("val/voc07_map")] == [
        (r["iter"], pytest.approx(r["map"], rel=1e-6)) for r in evals
    ]
    assert [(e.step, e.value) for e in events.Scalars("train_sample/voc07_map")] == [
        (r["iter"], pytest.approx(r["train_sample_map"], rel=1e-6)) for r in evals
    ]
    assert {f"val_ap/{name}" for name in SHAPES_CLASSES} <= set(events.Tags()["scalars"])
    image_tags = events.Tags()["images"]
    assert len(image_tags) == 4  # train.tensorboard_images of the 10 validation images
    for tag in image_tags:
        drawn = events.Images(tag)
        assert [e.step for e in drawn] == [6, 12] and (drawn[0].width, drawn[0].height) == (SIZE, SIZE)


def test_a_new_run_in_a_used_folder_starts_a_new_metrics_file(shapes, reference, tmp_path):
    out = Path(shutil.copytree(reference[0], tmp_path / "run"))
    summary = train(config(shapes, max_iter=2, eval_period=100), out)
    assert summary["iteration"] == 2
    assert [(r["iter"], "map" in r) for r in read_metrics(out)] == [(1, False), (2, False), (2, True)]
    assert load_checkpoint(out / "last.pt")["iteration"] == 2


def test_the_logged_map_is_what_ssd_eval_gives_for_the_saved_weights(reference, tmp_path):
    """``ssd eval`` with the run's config.yaml on last.pt (saved after the final evaluation) and on
    best.pt prints the mAP metrics.jsonl logged for them: one evaluation, of the saved weights."""
    out, summary = reference
    evals = [r for r in read_metrics(out) if "map" in r]
    best = next(r for r in evals if r["iter"] == summary["best_iter"])
    for weights, row in (("last.pt", evals[-1]), ("best.pt", best)):
        assert (
            main(
                ["eval", str(out / "config.yaml"), "--weights", str(out / weights), "--json", str(tmp_path / "m.json")]
            )
            == 0
        )
        result = json.loads((tmp_path / "m.json").read_text())
        assert (result["metric"], result["map"]) == (row["eval"], pytest.approx(row["map"], abs=1e-6)), weights
        assert result["per_class"] == pytest.approx(row["per_class"], abs=1e-6)


# --- precise BN beside the training loader -------------------------------------------------------------

PRECISE_BN = {"precise_bn_batches": 2, "precise_bn_before_eval": True}


def record_training_loaders(monkeypatch) -> list[list[list[str]]]:
    """Make every training-mode loader the engine builds record the image ids of each batch it yields:
    ``seen[k]`` for the k-th loader built (the training loader first)."""
    real_build, seen = engine.build_dataloader, []

    def build_dataloader(dataset, batch_size, train, **kwargs):
        loader = real_build(dataset, batch_size, train, **kwargs)
        if train:
            batches = []
            seen.append(batches)

            class Recording(DataLoader):
                def __iter__(self):
                    for batch in super().__iter__():
                        batches.append(batch["image_ids"])
                        yield batch

            loader.__class__ = Recording
        return loader

    monkeypatch.setattr(engine, "build_dataloader", build_dataloader)
    return seen


def planned_batches(root: Path) -> list[list[str]]:
    """The image ids of training batches 1..MAX_ITER as EpochIndexSampler orders them (seed 0, batch 8)."""
    records = build_dataset(config(root).data.train, None, train=True).records
    sampler, plan = EpochIndexSampler(len(records), shuffle=True, seed=config(root).train.seed), []
    for epoch in range(-(-MAX_ITER // 5)):
        sampler.set_epoch(epoch)
        order = [records[i % len(records)].image_id for i in sampler]
        plan += [order[b * 8 : (b + 1) * 8] for b in range(5)]
    return plan[:MAX_ITER]


@pytest.fixture(scope="module")
def precise_reference(shapes, tmp_path_factory) -> tuple[Path, list]:
    """The reference run with two loader workers and precise BN over 2 batches before each evaluation
    (6 and 12), uninterrupted; what its training-mode loaders yielded. Read only."""
    out = tmp_path_factory.mktemp("precise")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(out / "cache"))
        seen = record_training_loaders(mp)
        cfg = config(shapes, **PRECISE_BN)
        cfg.data.num_workers = 2
        train(cfg, out / "run")
    return out / "run", seen


def test_a_training_set_smaller_than_one_batch_trains_in_whole_batches(shapes_data, tmp_path, monkeypatch, caplog):
    """6 images at batch 8: an epoch is 4 passes (lcm 24 = 3 full batches), every image 4 times, nothing dropped."""
    small = shapes_data(6, 4, SIZE, 5)
    seen = record_training_loaders(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        train(config(small, max_iter=6, eval_period=6, checkpoint_period=6), tmp_path / "run")
    assert (
        "data.train has 6 images, fewer than a batch of 8 per process: an epoch is 4 passes (3 batches)" in caplog.text
    )
    batches = seen[0]
    assert len(batches) == 6 and all(len(ids) == 8 for ids in batches)
    for epoch in (batches[:3], batches[3:]):
        ids = [i for batch in epoch for i in batch]
        assert all(ids.count(i) == 4 for i in set(ids)) and len(set(ids)) == 6
    assert [r["iter"] for r in loss_rows(tmp_path / "run")] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in loss_rows(tmp_path / "run"))


def test_precise_bn_before_eval_leaves_the_training_batches_alone(shapes, reference, precise_reference):
    """With two persistent workers, precise BN reads its own loader: training sees the batches the
    sampler planned, in order, as without precise BN (same losses as the reference run; BN in train
    mode normalises with batch statistics, so the running ones precise BN rewrites do not enter them)."""
    out, seen = precise_reference
    plan = planned_batches(shapes)
    assert seen[0] == plan  # the training loader
    assert seen[1:] == [plan[5:7] + plan[10:12]]  # precise BN's: at iterations 6 and 12, 2 batches of epochs 1 and 2
    for ref, row in zip(loss_rows(reference[0]), loss_rows(out), strict=True):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), row["iter"]


def test_sigkill_then_resume_matches_the_uninterrupted_run(shapes, precise_reference, tmp_path, caplog):
    """``ssd train`` with two DataLoader workers, killed after the evaluation at iteration 6 (precise BN
    before it, which reads its own loader), then ``ssd train --resume`` in this process from last.pt,
    mid-epoch: the same losses, evaluations and weights as the uninterrupted single-process run
    (augmentation is seeded per (seed, epoch, index), so the worker count does not matter)."""
    options = [f"train.{k}={str(v).lower()}" for k, v in PRECISE_BN.items()]
    cfg_path = write_config(tmp_path / "run.yaml", run_dict(shapes))
    out = tmp_path / "run"
    args = [str(cfg_path), "--output-dir", str(out), "data.num_workers=2", *options]
    proc = start_cli(args, tmp_path, "killed.log")
    reached = wait_for_iteration(proc, out, 7)  # last.pt of iteration 6 exists, saved after its evaluation
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = load_checkpoint(out / "last.pt")["iteration"]
    assert saved in (6, 9) and saved <= reached < MAX_ITER
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 10, "loss": 1')  # a line torn by the kill is dropped on resume
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert main(["train", *args, "--resume"]) == 0
    assert f"resumed from {out / 'last.pt'} at iteration {saved}" in caplog.messages
    assert_same_run(precise_reference[0], out)
    assert (
        main(["eval", str(out / "config.yaml"), "--weights", str(out / "last.pt"), "--json", str(tmp_path / "m.json")])
        == 0
    )
    assert json.loads((tmp_path / "m.json").read_text())["map"] == pytest.approx(read_metrics(out)[-1]["map"], abs=1e-6)


# --- interruption and resume ------------------------------------------------------------------------


def test_sigterm_saves_last_pt_and_exits_then_resumes(shapes, reference, tmp_path):
    cfg_path = write_config(tmp_path / "run.yaml", run_dict(shapes))
    out = tmp_path / "run"
    proc = start_cli([str(cfg_path), "--output-dir", str(out)], tmp_path, "term.log")
    wait_for_iteration(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended
    stopped_at = load_checkpoint(out / "last.pt")["iteration"]
    assert 1 <= stopped_at < MAX_ITER and stopped_at == last_logged_iter(out)  # saved at the step it stopped on
    assert (
        f"stopped by SIGTERM at iteration {stopped_at}: saved {out / 'last.pt'}" in (tmp_path / "term.log").read_text()
    )

    summary = train(config(shapes), out, resume=True)  # in-process this time
    assert summary["iteration"] == MAX_ITER
    assert_same_run(reference[0], out)


def test_sigint_saves_last_pt_and_restores_the_handler(shapes, tmp_path, monkeypatch):
    def interrupt(call, losses):
        if call == 3:
            os.kill(os.getpid(), signal.SIGINT)

    patch_loss(monkeypatch, interrupt)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a shell's background job
    summary = train(config(shapes), tmp_path / "run")
    assert summary["stopped"] == "signal" and summary["iteration"] == 3  # the step in flight completes
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_corrupt_or_foreign_last_pt_is_refused_and_left_alone(shapes, reference, tmp_path, capsys):
    """last.pt and last.prev.pt both unreadable (one readable last.prev.pt: tests/test_lifecycle.py)."""
    out = Path(shutil.copytree(reference[0], tmp_path / "run"))
    metrics = (out / "metrics.jsonl").read_bytes()
    good = (out / "last.pt").read_bytes()
    for content in (good[: len(good) // 2], b"not a checkpoint"):
        (out / "last.pt").write_bytes(content)
        (out / "last.prev.pt").write_bytes(content)
        with pytest.raises(
            CheckpointError,
            match=r"last.pt: cannot read as a PyTorch weights file.*; and the previous "
            r"checkpoint .*last.prev.pt: cannot read",
        ):
            train(config(shapes), out, resume=True)
        assert (out / "last.pt").read_bytes() == content and (out / "metrics.jsonl").read_bytes() == metrics
        assert (out / "last.prev.pt").read_bytes() == content

        cfg_path = write_config(tmp_path / "run.yaml", run_dict(shapes))
        assert main(["train", str(cfg_path), "--output-dir", str(out), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ssd train: error: {out / 'last.pt'}: cannot read")
        assert f"{out / 'last.prev.pt'}: cannot read" in err[0]
    shutil.copy(out / "best.pt", out / "last.pt")
    shutil.copy(out / "best.pt", out / "last.prev.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train(config(shapes), out, resume=True)
    (out / "last.pt").write_bytes(good)
    cfg = config(shapes)
    cfg.model.width = 0.25  # refused before any weights are loaded: the run's own settings name the change
    with pytest.raises(ConfigError, match=r"last.pt as it was started, and this command changes model.width: 0.25"):
        train(cfg, out, resume=True)
    assert (out / "last.pt").read_bytes() == good


def test_resume_keeps_the_runs_own_settings_and_config_yaml(shapes, reference, tmp_path, caplog, capsys):
    """A run started with train.max_iter=... resumed with the YAML's length is refused in one line naming
    the key; settings that cannot change the result (the log period, eval.batch_size) are applied and logged;
    config.yaml is never rewritten by a resume."""
    out = Path(shutil.copytree(reference[0], tmp_path / "run"))
    saved = (out / "config.yaml").read_text()
    cfg_path = write_config(tmp_path / "run.yaml", run_dict(shapes))
    assert main(["train", str(cfg_path), "--output-dir", str(out), "--resume", "train.max_iter=3200"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "this command changes train.max_iter: 3200 given, 12 in the run" in err
    assert f"Resume with its own config: ssd train {out / 'config.yaml'} --output-dir {out} --resume" in err
    cfg = config(shapes)
    cfg.train.log_period, cfg.eval.batch_size = 2, 4
    (out / "last.pt").write_bytes((out / "last.prev.pt").read_bytes())  # resume from an earlier save
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert train(cfg, out, resume=True)["iteration"] == MAX_ITER
    assert "resume: train.log_period 1 -> 2 (applied: it does not change the result)" in caplog.messages
    assert "resume: eval.batch_size 10 -> 4 (applied: it does not change the result)" in caplog.messages
    assert (out / "config.yaml").read_text() == saved


def test_a_failed_checkpoint_write_keeps_the_previous_last_pt(shapes, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(None)
        if len(calls) == 2:  # the second last.pt, at iteration 4: die half-way through the write
            f.write(b"PK\x03\x04 half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        train(config(shapes, max_iter=6, checkpoint_period=2, eval_period=100, tensorboard=False), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "last.pt", "metrics.jsonl"]


# --- non-finite losses ------------------------------------------------------------------------------


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_non_finite_bn_statistics_stop_the_run_before_a_save_and_keep_the_last_one(shapes, tmp_path, monkeypatch):
    """BN running statistics gone non-finite with a finite loss (what a skipped step cannot catch): the next
    save refuses, names the layer, and last.pt keeps the state saved before."""

    from ssd.engine.step import TrainStep

    real_update, updates = TrainStep._update, []

    def nan_statistics_after_step_3(self, bad):
        skipped = real_update(self, bad)
        updates.append(None)
        if len(updates) == 3:  # after the backward, which reads the running statistics
            with torch.no_grad():
                dict(self.model.named_modules())["backbone.conv2.0.bn"].running_mean[0] = float("nan")
        return skipped

    monkeypatch.setattr(TrainStep, "_update", nan_statistics_after_step_3)
    cfg = run_dict(shapes, checkpoint_period=2)
    with pytest.raises(TrainingError, match=r"non-finite in backbone\.conv2\.0\.bn: not saved, .*last\.pt holds"):
        train(from_dict(Config, cfg), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["iteration"] == 2 and torch.isfinite(last["model"]["backbone.conv2.0.bn.running_mean"]).all()


def test_a_non_finite_loss_skips_the_step_and_logs_the_batch(shapes, tmp_path, monkeypatch, caplog):
    # the skip is decided on the device (the fused optimizer's found_inf): the step still counts as an
    # iteration, and the host logs it at the next log step with its iteration and images
    snapshots = []

    def nan_at_3_and_4(call, losses):
        snapshots.append(flat_parameters(models[0]))  # the weights this loss was computed with
        if call in (3, 4):
            losses["loc"] = losses["loc"] * float("nan")

    models = patch_loss(monkeypatch, nan_at_3_and_4)
    with caplog.at_level(logging.WARNING, logger="ssd.train"):
        summary = train(config(shapes, max_iter=6, eval_period=100), tmp_path / "run")
    assert summary["iteration"] == 6 and len(snapshots) == 6
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])  # no update
    assert not torch.equal(snapshots[1], snapshots[2]) and not torch.equal(snapshots[4], snapshots[5])
    assert torch.isfinite(flat_parameters(models[0])).all()

    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 2
    batches = []
    for iteration, message in zip((3, 4), warnings, strict=True):
        assert re.match(
            rf"iteration {iteration}: non-finite loss \(loc nan, conf [0-9.]+\), step skipped; images \[", message
        )
        batches.append(re.findall(r"'(train_\d{6})'", message))
    assert [len(set(b)) for b in batches] == [8, 8] and batches[0] != batches[1]

    rows = loss_rows(tmp_path / "run")
    assert [r["iter"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["skipped"] for r in rows] == [0, 0, 1, 1, 0, 0]
    # log_period 1: nothing to average
    assert [r["loss"] is None for r in rows] == [False, False, True, True, False, False]
    assert all(math.isfinite(r["loss"]) for r in rows if r["loss"] is not None)
    optimizer_state = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in optimizer_state.values()} == {4}  # AdamW stepped 4 times, not 6


def test_consecutive_non_finite_losses_stop_training_without_nan_weights(shapes, tmp_path, monkeypatch, capsys):
    snapshots = []

    def inf_from_3(call, losses):
        snapshots.append(flat_parameters(models[0]))
        if call >= 3:
            losses["conf"] = losses["conf"] + float("inf")

    models = patch_loss(monkeypatch, inf_from_3)
    cfg = run_dict(shapes, checkpoint_period=2, max_bad_steps=3)
    with pytest.raises(TrainingError, match=r"non-finite for 3 consecutive iterations \(last: 5\); stopping without"):
        train(from_dict(Config, cfg), tmp_path / "run")
    # last.pt at iteration 4 (two skipped steps, below max_bad_steps) holds the weights of iteration 2
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["iteration"] == 4 and all(
        torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point()
    )
    assert torch.equal(
        torch.cat([v.flatten() for k, v in last["model"].items() if k in dict(models[0].named_parameters())]),
        torch.cat([p.detach().flatten() for p in models[0].parameters()]),
    )
    assert torch.equal(snapshots[2], flat_parameters(models[0]))
    assert [r["iter"] for r in loss_rows(tmp_path / "run")] == [1, 2, 3, 4]

    # the CLI: one clear line and exit status 1 (not a user-input error, not a traceback)
    monkeypatch.undo()
    patch_loss(monkeypatch, inf_from_3)
    assert main(["train", str(write_config(tmp_path / "run.yaml", cfg)), "--output-dir", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssd train: training stopped: the loss was non-finite for 3 consecutive")


# --- fine-tuning --------------------------------------------------------------------------------------


@pytest.fixture
def three_class_checkpoint(shapes, tmp_path) -> Path:
    """A checkpoint of the same network with 2 foreground classes, plus one tensor the model lacks."""
    model_cfg = config(shapes).model
    model_cfg.num_classes = 3
    torch.manual_seed(1)
    ckpt = make_checkpoint(build_ssd(model_cfg).state_dict(), model_cfg, ["circle", "square"], "train")
    ckpt["model"]["aux.weight"] = torch.ones(3)
    save_checkpoint(ckpt, tmp_path / "three.pt")
    return tmp_path / "three.pt"


def test_init_loads_matching_tensors_and_keeps_fresh_heads(shapes, three_class_checkpoint):
    source = load_checkpoint(three_class_checkpoint)["model"]
    torch.manual_seed(2)
    model = build_ssd(config(shapes).model)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_weights_from(model, str(three_class_checkpoint), backbone_only=False)

    conf_keys = sorted(k for k in fresh if k.startswith("head.conf."))
    assert sorted(report["reinitialised"]) == conf_keys and len(conf_keys) == 8  # 4 levels x (weight, bias)
    assert report["ignored"] == ["aux.weight"]
    assert sorted(report["loaded"]) == sorted(k for k in fresh if k not in conf_keys)
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in report["loaded"])
    assert all(torch.equal(state[k], fresh[k]) for k in conf_keys)

    model = build_ssd(config(shapes).model)
    report = init_weights_from(model, str(three_class_checkpoint), backbone_only=True)
    assert report["loaded"] and all(k.startswith("backbone.") for k in report["loaded"])
    assert "head.loc.0.weight" in report["ignored"]

    model_cfg = config(shapes).model  # another width and 2 priors per cell: only BN's step counters fit
    model_cfg.width, model_cfg.priors.aspect_ratios = 0.25, [[]] * 4
    with pytest.raises(CheckpointError, match="no tensor matches this model by name and shape"):
        init_weights_from(build_ssd(model_cfg), str(three_class_checkpoint), backbone_only=False)


def test_init_matches_class_head_rows_by_name_in_any_order(shapes, three_class_checkpoint, caplog):
    """The checkpoint knows circle and square; the model lists Square, triangle, circle, star. Each level's
    conf conv (anchor-major channels a * C + c) gets the background's, square's and circle's rows from the
    checkpoint's rows 0, 2, 1; triangle and star keep their fresh rows."""
    source = load_checkpoint(three_class_checkpoint)["model"]
    torch.manual_seed(2)
    model = build_ssd(config(shapes).model)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    classes = ["Square", "triangle", "circle", "star"]
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        report = init_weights_from(model, str(three_class_checkpoint), backbone_only=False, classes=classes)
    conf_keys = sorted(k for k in fresh if k.startswith("head.conf."))
    assert sorted(report["by_class"]) == conf_keys and report["reinitialised"] == []
    state = model.state_dict()
    for key in conf_keys:
        got, new = state[key].unflatten(0, (-1, 5)), fresh[key].unflatten(0, (-1, 5))  # [A, 5, ...]
        old = source[key].unflatten(0, (-1, 3))
        assert torch.equal(got[:, [0, 1, 3]], old[:, [0, 2, 1]]) and torch.equal(got[:, [2, 4]], new[:, [2, 4]])
    assert "class head rows matched by name: reused Square, circle (and the background), fresh triangle, star" in (
        caplog.text
    )

    model = build_ssd(config(shapes).model)  # no name in common (repeated names never match): all fresh
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_weights_from(model, str(three_class_checkpoint), False, classes=["cat", "N/A", "N/A", "dog"])
    assert sorted(report["reinitialised"]) == conf_keys and report["by_class"] == []
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in conf_keys)


def test_cli_init_fine_tunes_onto_another_class_count(shapes, three_class_checkpoint, tmp_path, caplog):
    cfg_path = write_config(tmp_path / "run.yaml", run_dict(shapes, max_iter=1))
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        code = main(
            ["train", str(cfg_path), "--output-dir", str(tmp_path / "run"), "--init", str(three_class_checkpoint)]
        )
    assert code == 0
    # the data's circle and square reuse the checkpoint's rows; triangle and star start fresh
    rows, message = [r.getMessage() for r in caplog.records if r.getMessage().startswith("init from")]
    assert rows.endswith("matched by name: reused circle, square (and the background), fresh triangle, star")
    assert message == (
        f"init from {three_class_checkpoint}: loaded 123 tensors, 8 by class name, re-initialised 0 "
        "(shape differs: -), ignored 1 (aux.weight)"
    )
    assert load_config(tmp_path / "run" / "config.yaml").model.init == str(three_class_checkpoint)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["model"]["head.conf.0.bias"].shape == (4 * 5,)


# --- schedule ---------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_multistep_and_time_following():
    from ssd.config import ConfigError, TrainConfig

    cos = TrainConfig(max_iter=100, schedule="cosine", warmup_iters=10, warmup_factor=0.1)
    assert [lr_factor(i, cos) for i in (0, 5)] == pytest.approx([0.1, 0.55 * (0.5 + 0.5 * math.cos(math.pi * 0.05))])
    assert [lr_factor(i, cos) for i in (50, 100, 120)] == pytest.approx([0.5, 0.0, 0.0], abs=1e-12)
    assert lr_factor(50, cos, time_fraction=0.9) == pytest.approx(0.5)  # time ignored unless schedule_by_time

    by_time = TrainConfig(max_iter=100, schedule="cosine", warmup_iters=0, time_limit=60, schedule_by_time=True)
    assert lr_factor(10, by_time, time_fraction=0.5) == pytest.approx(0.5)  # time ahead of iterations
    assert lr_factor(75, by_time, time_fraction=0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(10, by_time, time_fraction=1.3) == pytest.approx(0.0, abs=1e-12)

    steps = TrainConfig(
        max_iter=100,
        schedule="multistep",
        steps=[50, 80],
        gamma=0.1,
        warmup_iters=0,
        time_limit=60,
        schedule_by_time=True,
    )
    assert [lr_factor(10, steps, f) for f in (0.1, 0.6, 0.85)] == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ConfigError, match="train.schedule_by_time needs train.time_limit"):
        TrainConfig(schedule_by_time=True)


# --- host memory ------------------------------------------------------------------------------------------

FAULT_PROBE = """
import resource, sys, torch
from ssd.device import retain_freed_memory
took = retain_freed_memory() if sys.argv[1] == "retain" else None
def step():  # a training step's pattern: 4-28 MiB buffers (112 MiB in all) allocated, then all freed
    buffers = [torch.ones(n << 20) for n in (1, 3, 7, 2, 5, 6, 4)]
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_host_memory_stops_the_per_step_page_faults():
    # glibc's initial thresholds (128 KiB), pinned: its dynamic threshold would otherwise follow what the
    # imports happened to allocate and free, and the baseline would vary from run to run
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULT_PROBE, mode], env=env, capture_output=True, text=True, check=True
        )
        took, count = out.stdout.split()
        return took, int(count)

    (took_default, default), (took, retained) = faults("default"), faults("retain")
    assert (took_default, took) == ("None", "True")
    # 10 steps x 112 MiB (28,672 pages a step): handed back to the kernel and faulted in again every step
    assert default > 10 * 112 * 256 // 2, default
    assert retained < default // 10, (retained, default)
