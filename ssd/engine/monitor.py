"""What a training run shows and listens to: stop signals, TensorBoard, the progress bar."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from ssd.data.dataset import read_image
from ssd.engine.distributed import DistContext
from ssd.visualize import draw_detections

log = logging.getLogger("ssd.train")


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves ``last.pt`` and returns at the next step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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
                if row.get(key) is not None:  # no loss terms when every step of the window was skipped; grad_scale: fp16
                    self.writer.add_scalar(f"train/{key}", row[key], row["iter"])

    def eval_row(self, it: int, res: dict) -> None:
        if not self.writer:
            return
        self.writer.add_scalar(f"val/{res['metric']}_map", res["map"], it)
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
        samples.append((rec.image_id, draw_detections(read_image(rec.path), d["boxes"], d["scores"], d["labels"], dataset.classes)))
    return samples


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()




def progress_bar(total: int, start: int, ctx: DistContext):
    if not ctx.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")
