"""A run's life span (ssd.engine.lifecycle and the loop around it): resume keeps the training time of
``train.time_limit`` / ``schedule_by_time``; SIGTERM / SIGINT to the whole process group (two real
loader workers) stop cleanly; an unreadable ``last.pt`` falls back to ``last.prev.pt``; a rejected run
writes nothing; an unreadable image is warned about once, by name; the ETA of the log line.

The runs are tests/test_train.py's: a width-1/8 SSD at 64 px on 40 generated training images, batch 8
(5 iterations per epoch), one CPU thread. A fake clock of one second per training step
(:func:`ssd.engine.lifecycle.now`) makes time limits exact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_dict

import ssd.engine.train as engine
from ssd.checkpoint import load_checkpoint
from ssd.cli import main
from ssd.config import Config, from_dict
from ssd.engine import checkpoints, lifecycle
from ssd.engine.monitor import Eta, SkippedImages, format_eta
from ssd.engine.train import train

SIZE = 64


def run_dict(root: Path, **train_options) -> dict:
    options = {"max_iter": 12, "optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup_iters": 2}
    options |= {"checkpoint_period": 3, "tensorboard": False}
    return tiny_run_dict(root, **{**options, **train_options})


def config(root: Path, **train_options) -> Config:
    return from_dict(Config, run_dict(root, **train_options))


def loss_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def last_logged_iter(out: Path) -> int:
    try:
        return max((r["iter"] for r in loss_rows(out)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half written
        return 0


def steps_with(monkeypatch, on_step) -> None:
    """Call ``on_step(n)`` in the n-th loss evaluation of the test (every run it starts counts)."""
    real_build_loss, calls = engine.build_loss, [0]

    def build_loss(loss_cfg, model_cfg):
        criterion = real_build_loss(loss_cfg, model_cfg)

        def counted(*args):
            calls[0] += 1
            on_step(calls[0])
            return criterion(*args)

        return counted

    monkeypatch.setattr(engine, "build_loss", build_loss)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    """40 train + 10 val images at 64 px. Read only."""
    return shapes_data(40, 10, SIZE, 3)


# --- the training time across a resume ----------------------------------------------------------------


def test_resume_goes_on_with_the_training_time_and_stops_where_the_uninterrupted_run_did(
    shapes, tmp_path, monkeypatch, caplog
):
    """train.time_limit 7.5 s with schedule_by_time, one fake second per step: the uninterrupted run
    stops after step 8. Interrupted after step 6 (SIGINT) and resumed, it logs times 1..8 (never going
    back), the same learning rates (the cosine does not start again) and losses, and stops at step 8.
    The stop came right after train.checkpoint_period's save of step 6: last.pt is not written again,
    so last.prev.pt still holds step 3."""
    ticks = [0.0]
    monkeypatch.setattr(lifecycle, "now", lambda: ticks[0])
    interrupt_at = [0]

    def step(call: int) -> None:
        ticks[0] += 1.0
        if call == interrupt_at[0]:
            os.kill(os.getpid(), signal.SIGINT)

    steps_with(monkeypatch, step)
    cfg = config(shapes, time_limit=7.5, schedule_by_time=True)
    reference = train(cfg, tmp_path / "reference")
    assert (reference["stopped"], reference["iteration"]) == ("time_limit", 8)
    ref_rows = loss_rows(tmp_path / "reference")
    assert [r["time"] for r in ref_rows] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]

    out = tmp_path / "run"
    interrupt_at[0] = 8 + 6  # the 6th step of the second run
    interrupted = train(cfg, out)
    assert (interrupted["stopped"], interrupted["iteration"], interrupted["signal"]) == ("signal", 6, "SIGINT")
    assert (load_checkpoint(out / "last.pt")["iteration"], load_checkpoint(out / "last.pt")["elapsed"]) == (6, 6.0)
    assert load_checkpoint(out / "last.prev.pt")["iteration"] == 3
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        resumed = train(cfg, out, resume=True)
    assert (resumed["stopped"], resumed["iteration"]) == ("time_limit", 8)
    assert "train.time_limit 8 s reached at iteration 8" in caplog.messages  # 7.5 printed as %.0f

    rows = loss_rows(out)
    assert [r["iter"] for r in rows] == list(range(1, 9))
    assert [r["time"] for r in rows] == [r["time"] for r in ref_rows]  # 1..8: never back to 0
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in ref_rows], rel=1e-12, abs=1e-15)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    assert (
        load_checkpoint(out / "last.pt")["elapsed"]
        == load_checkpoint(tmp_path / "reference" / "last.pt")["elapsed"]
        == 8.0
    )
    iter_lines = [m for m in caplog.messages if re.match(r"iter \d+/12 ", m)]
    assert len(iter_lines) == 2 and all(re.search(r" img/s eta \d+:\d\d:\d\d$", m) for m in iter_lines), iter_lines


# --- stop signals to the process group ---------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that have not ended (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_process_group_stops_cleanly(shapes, tmp_path, sig):
    """``timeout``, Slurm, Kubernetes and Ctrl-C signal the whole group, loader workers included: exit
    code 128 + signal, one log line naming it, last.pt of the iteration it stopped at with its training
    time, no traceback, no best mAP (nothing was evaluated), and no process of the group left."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_dict(shapes, max_iter=500, checkpoint_period=1000, eval_period=1000)))
    out, log_path = tmp_path / "run", tmp_path / "train.log"
    env = {**os.environ, "SSD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ssd", "train", str(cfg_path), "--output-dir", str(out), "data.num_workers=2"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while last_logged_iter(out) < 2:  # the workers have started and served batches
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert code == 128 + sig, text  # 143 / 130
    assert "Traceback" not in text and "best mAP" not in text, text
    stop_lines = [line for line in text.splitlines() if sig.name in line]
    assert len(stop_lines) == 1, text
    stopped_at = int(
        re.fullmatch(
            rf"WARNING stopped by {sig.name} at iteration (\d+): saved (.+); continue with --resume", stop_lines[0]
        ).group(1)
    )
    ckpt = load_checkpoint(out / "last.pt")
    rows = loss_rows(out)
    assert 2 <= stopped_at == ckpt["iteration"] == rows[-1]["iter"] < 500
    assert ckpt["elapsed"] >= rows[-1]["time"] > 0
    deadline = time.monotonic() + 10
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(proc.pid) == []  # the workers ended with their owner


# --- last.prev.pt ------------------------------------------------------------------------------------------


def test_an_unreadable_last_pt_falls_back_to_last_prev_pt(shapes, tmp_path, monkeypatch, caplog):
    """last.pt is written every 2 steps, the file it replaces kept as last.prev.pt. A run stopped after
    step 5 leaves last.pt (5) and last.prev.pt (4); with last.pt truncated, --resume continues from
    last.prev.pt with a warning naming both, recomputes step 5 exactly, and does not keep the
    unreadable file as last.prev.pt."""
    steps_with(monkeypatch, lambda call: os.kill(os.getpid(), signal.SIGINT) if call == 5 else None)
    saves = []
    real_save = checkpoints.save_checkpoint
    monkeypatch.setattr(
        checkpoints,
        "save_checkpoint",
        lambda obj, path, keep_previous=None: (
            saves.append((obj.get("iteration"), Path(path).name, keep_previous and Path(keep_previous).name)),
            real_save(obj, path, keep_previous),
        )[1],
    )
    cfg = config(shapes, max_iter=8, checkpoint_period=2)
    out = tmp_path / "run"
    assert train(cfg, out)["iteration"] == 5
    assert (load_checkpoint(out / "last.pt")["iteration"], load_checkpoint(out / "last.prev.pt")["iteration"]) == (5, 4)
    logged = loss_rows(out)
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])

    saves.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert train(cfg, out, resume=True)["iteration"] == 8
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.fullmatch(
        rf"{re.escape(str(out / 'last.pt'))}: cannot read as a PyTorch weights file.*; resuming from "
        rf"the previous checkpoint {re.escape(str(out / 'last.prev.pt'))} \(iteration 4\) instead",
        warning,
    )
    assert f"resumed from {out / 'last.prev.pt'} at iteration 4" in caplog.messages
    rows = loss_rows(out)
    assert [r["iter"] for r in rows] == list(range(1, 9))
    assert rows[4]["loss"] == pytest.approx(logged[4]["loss"], rel=1e-5)  # step 5 again, from last.prev.pt
    # the unreadable last.pt is replaced, not kept; then every save keeps the previous one again
    assert saves[0] == (6, "last.pt", None) and saves[1] == (8, "last.pt", "last.prev.pt")
    assert (load_checkpoint(out / "last.prev.pt")["iteration"], load_checkpoint(out / "last.pt")["iteration"]) == (8, 8)


# --- rejected runs ---------------------------------------------------------------------------------------------


def test_a_rejected_run_writes_nothing_into_its_output_folder(shapes, tmp_path, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_dict(shapes)))
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--output-dir", str(out), "model.num_classes=3"]) == 2
    assert "model.num_classes is 3 but data.train has 4 classes" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", str(cfg_path), "--output-dir", str(out), "--resume"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"ssd train: error: {out / 'last.pt'}: nothing to resume (train without --resume to start)"
    )
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(config(shapes), out, resume=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_interrupted_demo_prints_no_map(tmp_path, monkeypatch, capsys):
    import ssd.demo as demo

    monkeypatch.setattr(demo, "ensure_shapes", lambda out, **data: out)
    monkeypatch.setattr(
        demo,
        "train",
        lambda cfg, out: {"iteration": 3, "best_map": -1.0, "best_iter": 0, "stopped": "signal", "signal": "SIGTERM"},
    )
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 143
    assert "mAP" not in capsys.readouterr().out


# --- unreadable images --------------------------------------------------------------------------------------


def test_the_unreadable_image_summary_appears_only_when_the_set_of_files_grows(caplog):
    """Two bad files, one of them now and then in the dropped last batch: counts 1, 2, 1, 2, 2, 1 over six
    epochs give two summary lines (the set grew at epochs 0 and 1), not one per change of count."""
    skipped = SkippedImages()
    files = {1: ["a.jpg: truncated"], 2: ["a.jpg: truncated", "b.jpg: truncated"]}
    with caplog.at_level(logging.WARNING, logger="ssd.train"):
        for epoch, count in enumerate([1, 2, 1, 2, 2, 1]):
            skipped.add(files[count])
            skipped.end_epoch(epoch)
    assert [m for m in caplog.messages if "unreadable image(s)" in m] == [
        "epoch 0: skipped 1 unreadable image(s), 1 file(s) in all so far",
        "epoch 1: skipped 2 unreadable image(s), 2 file(s) in all so far",
    ]
    assert len([m for m in caplog.messages if m.startswith("skipped unreadable image")]) == 2  # once per file


def test_an_unreadable_image_is_warned_about_once_by_name(shapes, tmp_path, caplog):
    """Garbage in one training JPEG, two loader workers, three epochs: one warning naming the file, one
    epoch summary (the count stays 1 after epoch 0), and every other image trains."""
    root = Path(shutil.copytree(shapes, tmp_path / "shapes"))
    image_id = (root / "ImageSets" / "Main" / "train.txt").read_text().split()[7]
    bad = root / "JPEGImages" / f"{image_id}.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] + bytes(range(1, 200)) * 4)  # no end-of-image marker after the scan
    cfg = config(root, max_iter=15, checkpoint_period=100, log_period=5)
    cfg.data.num_workers = 2
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert train(cfg, tmp_path / "run")["iteration"] == 15
    naming = [m for m in caplog.messages if str(bad) in m]
    assert naming == [
        f"skipped unreadable image {bad}: truncated JPEG (no end-of-image marker after the image data) "
        "(data.on_error; counted per epoch from now on)"
    ]
    assert [m for m in caplog.messages if "unreadable image(s)" in m] == [
        "epoch 0: skipped 1 unreadable image(s), 1 file(s) in all so far"
    ]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in rows if "map" in r]
    assert 0.0 <= final["train_sample_map"] <= 1.0  # scored on the 39 readable training images, silently


# --- the ETA -----------------------------------------------------------------------------------------------------


def test_eta_follows_the_recent_iteration_rate_and_the_time_limit():
    eta = Eta(max_iter=100, time_limit=None, recent_s=30.0)
    assert eta.update(10, 10, 50.0, elapsed=50.0) == pytest.approx(90 * 5.0)  # only the first window: its rate
    assert eta.update(20, 10, 10.0, elapsed=60.0) == pytest.approx(80 * 1.0)  # the first (start-up) window dropped
    assert eta.update(30, 10, 20.0, elapsed=80.0) == pytest.approx(70 * 1.5)  # windows 2 and 3: 30 s
    assert eta.update(40, 10, 40.0, elapsed=120.0) == pytest.approx(60 * 4.0)  # window 4 alone is 30+ s
    # the machine became 10x faster (its neighbour finished): the estimate follows within 30 s of training
    slow = Eta(max_iter=1000, time_limit=None)
    for i in range(1, 6):
        slow.update(10 * i, 10, 40.0, elapsed=40.0 * i)
    per_iteration = [slow.update(50 + 10 * i, 10, 4.0, elapsed=200.0 + 4 * i) / (950 - 10 * i) for i in range(1, 9)]
    assert per_iteration[0] == pytest.approx((40 + 4) / 20) and per_iteration[-1] == pytest.approx(0.4)
    limited = Eta(max_iter=100, time_limit=100.0)
    assert limited.update(10, 10, 10.0, elapsed=12.0) == pytest.approx(88.0)  # the time limit ends it first
    assert limited.update(20, 10, 10.0, elapsed=130.0) == 0.0
    assert [format_eta(s) for s in (0.4, 59.9, 3723.9, 90061.0)] == ["0:00:00", "0:00:59", "1:02:03", "1 day, 1:01:01"]
