"""What a training run shows and writes as it goes: the log line or progress bar with its ETA,
``metrics.jsonl``, TensorBoard, skipped images (:class:`TrainLog` holds them together)."""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ssd.config import TrainConfig
from ssd.data.dataset import read_image
from ssd.engine.distributed import DistContext
from ssd.engine.lifecycle import TrainClock
from ssd.engine.machine_load import BusyMachine
from ssd.engine.step import TrainStep
from ssd.visualize import draw_detections

log = logging.getLogger("ssd.train")


class Eta:
    """Seconds left: the recent time per iteration (training time of the latest log windows that add up
    to ``recent_s`` seconds, evaluations and saves not counted) times the iterations left; or the time
    left when ``train.time_limit`` ends the run sooner. Recent, not the average since the start: when
    the machine's load changes, the estimate follows within ``recent_s``. This process's first window
    (the loader's start, compilation) counts only until a second one exists."""

    def __init__(self, max_iter: int, time_limit: float | None, recent_s: float = 30.0) -> None:
        self.max_iter, self.time_limit, self.recent_s = max_iter, time_limit, recent_s
        self.first: tuple[int, float] | None = None
        self.recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=1000)

    def update(self, iteration: int, iterations: int, seconds: float, elapsed: float) -> float:
        """A log window of ``iterations`` steps in ``seconds`` ended at ``iteration``, ``elapsed``
        seconds into training (:class:`ssd.engine.lifecycle.TrainClock`)."""
        if self.first is None:
            self.first = (iterations, seconds)
        else:
            self.recent.append((iterations, seconds))
        iterations_sum, seconds_sum = 0, 0.0
        for n, s in reversed(self.recent or [self.first]):
            iterations_sum, seconds_sum = iterations_sum + n, seconds_sum + s
            if seconds_sum >= self.recent_s:
                break
        per_iteration = seconds_sum / max(1, iterations_sum)
        left = (self.max_iter - iteration) * per_iteration
        if self.time_limit is not None:
            left = min(left, max(0.0, self.time_limit - elapsed))
        return left


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))  # 1:02:03, 2 days, 3:04:05


class SkippedImages:
    """Images the loader skipped as unreadable (``data.on_error``): each file is warned about once, by
    the message that names it, whichever worker read it and in whichever epoch; an epoch's count is
    logged only when the set of unreadable files has grown since the last summary (a file dropped with
    an incomplete last batch in one epoch and read in the next would otherwise log a line per epoch)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.count = 0  # in this epoch
        self.files_logged = 0

    def add(self, errors: list[str]) -> None:
        """A batch's ``errors`` (:func:`ssd.data.dataset.collate`): messages that start with the file name."""
        self.count += len(errors)
        for message in errors:
            if message not in self.warned:
                self.warned.add(message)
                log.warning("skipped unreadable image %s (data.on_error; counted per epoch from now on)", message)

    def end_epoch(self, epoch: int) -> None:
        count, self.count = self.count, 0
        if count and len(self.warned) > self.files_logged:
            log.warning(
                "epoch %d: skipped %d unreadable image(s), %d file(s) in all so far", epoch, count, len(self.warned)
            )
            self.files_logged = len(self.warned)


class TensorBoard:
    """Scalars and a few validation images with drawn detections in ``OUTPUT_DIR/tensorboard`` (rank 0),
    when the optional ``tensorboard`` package is installed; a no-op otherwise."""

    def __init__(self, enabled: bool, log_dir: Path) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed (pip install 'ssd[tensorboard]'): metrics go to metrics.jsonl only")
            return
        self.writer = SummaryWriter(str(log_dir))

    def train_row(self, row: dict) -> None:
        if self.writer:
            for key in ("loss", "loc", "conf", "lr", "images_per_s", "skipped", "grad_scale"):
                # no loss terms when every step of the window was skipped; grad_scale: fp16
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], row["iter"])

    def eval_row(self, it: int, res: dict) -> None:
        if not self.writer:
            return
        self.writer.add_scalar(f"val/{res['metric']}_map", res["map"], it)
        if "map_50_95" in res:  # COCO's AP over IoU .50:.95, on any data
            self.writer.add_scalar("val/map_50_95", res["map_50_95"], it)
        if "train_sample_map" in res:  # eval.train_sample: the same metric on training images
            self.writer.add_scalar(f"train_sample/{res['metric']}_map", res["train_sample_map"], it)
        if "metrics" in res:  # train.ema: val/<metric>_map is the EMA weights', this the raw weights'
            self.writer.add_scalar(f"val/{res['metric']}_map_raw", res["metrics"]["map_raw"], it)
        for name, ap in res["per_class"].items():
            self.writer.add_scalar(f"val_ap/{name}", ap, it)
        for image_id, drawn in res.get("samples", []):
            self.writer.add_image(f"val_images/{image_id}", drawn, it, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def draw_samples(dataset, predictions: dict, count: int) -> list[tuple[str, np.ndarray]]:
    """The first ``count`` validation images with their detections drawn (for TensorBoard)."""
    samples = []
    for rec in dataset.records[:count]:
        d = predictions[rec.image_id]
        samples.append(
            (
                rec.image_id,
                draw_detections(
                    read_image(rec.path, rec.orientation), d["boxes"], d["scores"], d["labels"], dataset.classes
                ),
            )
        )
    return samples


def progress_bar(total: int, start: int, ctx: DistContext):
    if not ctx.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")


class TrainLog:
    """The run's log: a row every ``train.log_period`` steps to ``metrics.jsonl`` (rank 0), TensorBoard
    and the log line (or the progress bar on a terminal), with images/s and the ETA over training time
    only (evaluations and saves are not counted: :meth:`paused`)."""

    def __init__(self, tcfg: TrainConfig, ctx: DistContext, out: Path, start: int, append: bool, cpu: bool) -> None:
        self.tcfg, self.ctx = tcfg, ctx
        self.tensorboard = TensorBoard(tcfg.tensorboard and ctx.is_main, out / "tensorboard")
        self.file = open(out / "metrics.jsonl", "a" if append else "w") if ctx.is_main else None
        self.eta = Eta(tcfg.max_iter, tcfg.time_limit)
        self.busy = BusyMachine() if ctx.world_size == 1 and cpu else None  # other ranks are not "other load"
        self.progress = progress_bar(tcfg.max_iter, start, ctx)
        self.images, self.iters, self.t = 0, 0, time.perf_counter()

    def count(self, images: int) -> None:
        """One training step of ``images`` per process (and the progress bar's step)."""
        self.images += images * self.ctx.world_size
        self.iters += 1
        if self.progress is not None:
            self.progress.update(1)

    @contextlib.contextmanager
    def paused(self):
        t_pause = time.perf_counter()
        yield
        self.t += time.perf_counter() - t_pause

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def train_row(self, it: int, step: TrainStep, clock: TrainClock) -> None:
        """The log step: the one synchronisation of a log period (:meth:`TrainStep.take_window`)."""
        dt = time.perf_counter() - self.t
        steps, elapsed = step.take_window(), clock.elapsed()
        lr = step.optimizer.param_groups[0]["lr"]
        row = {"iter": it, **steps.row(), "lr": lr, "images_per_s": self.images / max(dt, 1e-9), "time": elapsed}
        left = format_eta(self.eta.update(it, self.iters, dt, elapsed))
        if self.busy is not None:
            self.busy.check(self.iters, torch.get_num_threads())
        if step.scaler.is_enabled():  # fp16: the scale, and the steps the GradScaler skipped for overflowing gradients
            row["grad_scale"], row["amp_skipped"] = step.scaler.get_scale(), steps.amp_skipped
        self.write(row)
        self.tensorboard.train_row(row)
        self.images, self.iters, self.t = 0, 0, time.perf_counter()
        if row["loss"] is None:  # every step since the last row was skipped: TrainStep.check warned about each
            return
        if self.progress is not None:
            terms = {k: f"{row[k]:.3f}" for k in ("loss", "loc", "conf")}
            self.progress.set_postfix(**terms, lr=f"{lr:.2e}", ips=f"{row['images_per_s']:.1f}", eta=left)
        elif self.ctx.is_main:
            log.info(
                "iter %d/%d loss %.4f (loc %.4f conf %.4f) lr %.2e %.1f img/s eta %s",
                it, self.tcfg.max_iter, row["loss"], row["loc"], row["conf"], lr, row["images_per_s"], left,
            )  # fmt: skip

    def eval_row(self, it: int, res: dict) -> None:
        both = res.get("metrics", {})  # train.ema: "map" is the EMA weights'; map_ema, map_raw name each
        sample = {"train_sample_map": res["train_sample_map"]} if "train_sample_map" in res else {}
        coco = {"map_50_95": res["map_50_95"]} if "map_50_95" in res else {}
        row = {"iter": it, "eval": res["metric"], "map": res["map"], **coco, **sample, "per_class": res["per_class"]}
        row |= both
        self.write(row)
        self.tensorboard.eval_row(it, res)
        raw = f" (EMA; raw weights {both['map_raw']:.4f})" if both else ""
        on_train = f"; training sample {sample['train_sample_map']:.4f}" if sample else ""
        coco_ap = f", mAP@[.50:.95] {coco['map_50_95']:.4f}" if coco and res["metric"] != "coco" else ""
        log.info("iter %d: %s mAP %.4f%s%s%s", it, res["metric"], res["map"], coco_ap, raw, on_train)

    def end_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def close(self) -> None:
        self.end_progress()
        self.tensorboard.close()
        if self.file:
            self.file.close()
