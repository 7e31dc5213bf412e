"""What a training run shows: the ETA of the log line, skipped images, TensorBoard, the progress bar."""

from __future__ import annotations

import collections
import datetime
import logging
import sys
from pathlib import Path

import numpy as np

from ssd.data.dataset import read_image
from ssd.engine.distributed import DistContext
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
