"""``results.png``: a run's ``metrics.jsonl`` as pictures: the loss and its parts, the learning rate, and the
validation and training-sample mAP against iterations (needs matplotlib: ``pip install 'ssd[plots]'``)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger("ssd.train")

RESULTS_PNG = "results.png"


def plot_results(rows: list[dict], path: Path) -> Path | None:
    """Draw ``rows`` (metrics.jsonl's) into ``path``; None, with one log line, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("%s needs matplotlib, which is not installed: pip install 'ssd[plots]'", path.name)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if "map" in r]
    fig = Figure(figsize=(13, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, map_ax = fig.subplots(1, 3)
    iters = [r["iter"] for r in train]
    for key in ("loss", "loc", "conf"):
        loss_ax.plot(iters, [r[key] for r in train], label=key)
    loss_ax.set(title="training loss", xlabel="iteration")
    lr_ax.plot(iters, [r["lr"] for r in train])
    lr_ax.set(title="learning rate", xlabel="iteration")
    metric = evals[-1]["eval"] if evals else "map"
    series = [("map", f"validation {metric}"), ("train_sample_map", f"training sample {metric}"),
              ("map_50_95", "validation mAP@[.50:.95]")]  # fmt: skip
    for key, label in series:
        points = [(r["iter"], r[key]) for r in evals if r.get(key) is not None]
        if points:
            map_ax.plot(*zip(*points, strict=True), marker="o", label=label)
    map_ax.set(title="mAP", xlabel="iteration", ylim=(0, 1))
    for ax in (loss_ax, map_ax):
        if ax.lines:
            ax.legend()
    for ax in (loss_ax, lr_ax, map_ax):
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path
