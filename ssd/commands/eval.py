"""``ssd eval``: score a checkpoint or a detections file on ``data.val`` (or ``data.train``); the table,
``--json``, the precision/recall plots and the detection files (COCO results, VOC devkit comp4)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from ssd.config import Config, ConfigError, DatasetConfig, load_config
from ssd.data.dataset import build_dataset, index_dataset
from ssd.data.records import DatasetError, Problems, boxes_per_class
from ssd.engine.distributed import cleanup
from ssd.engine.eval_table import format_table
from ssd.engine.evalset import EvalSet, add_coco_ap, safe_name
from ssd.engine.evaluate import predict_checkpoint
from ssd.metrics.coco import COCO_STATS

log = logging.getLogger("ssd.eval")


def training_boxes(cfg: Config) -> dict[str, int] | None:
    """Boxes per class that training learns from in ``data.train`` (difficult / crowd left out), or None
    when ``data.train`` cannot be indexed here (not configured, not on this machine): the table shows ``-``."""
    try:
        records, classes = index_dataset(cfg.data.train, Problems("skip"), "data.train")
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        log.info("no training box counts: %s", e)
        return None
    return boxes_per_class(records, classes)


def _json_number(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def metrics_json(result: dict) -> dict:
    """The ``--json`` content: metric, map, map_50_95, per_class (null: no ground truth), num_gt, COCO's 12
    numbers."""
    out = {
        "metric": result["metric"],
        "map": _json_number(result["map"]),
        **({"map_50_95": _json_number(result["map_50_95"])} if "map_50_95" in result else {}),
        "per_class": {k: _json_number(v) for k, v in result["per_class"].items()},
        "num_gt": dict(result["num_gt"]),
    }
    out.update({k: result[k] for k in COCO_STATS if k in result})
    return out


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plots needs matplotlib, which is not installed: pip install 'ssd[plots]'")


def write_pr_plots(out_dir: str | os.PathLike, result: dict) -> list[Path]:
    """One ``pr_<class>.png`` per class: precision over recall (no pyplot: no global backend state)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ap in result["per_class"].items():
        fig = Figure(figsize=(5, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, recall, precision in result["curves"].get(name, []):
            if len(recall):
                ax.plot(recall, precision, drawstyle="steps-post", label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.grid(alpha=0.3)
        ap_text = "no ground truth" if math.isnan(ap) else f"AP {ap:.4f}"
        ax.set_title(f"{name}: {ap_text} ({result['metric']}, {result['num_gt'][name]} GT)")
        if ax.lines:
            ax.legend(loc="lower left")
        paths.append(out_dir / f"pr_{safe_name(name)}.png")
        fig.savefig(paths[-1])
    return paths


def split_name(cfg: DatasetConfig) -> str:
    """The ``<split>`` of comp4 file names: the VOC split (``test``), or the COCO file's stem without ``instances_``."""
    if cfg.format == "coco":
        return re.sub(r"^instances_", "", Path(cfg.annotations or "coco").stem)
    splits = [cfg.split] if isinstance(cfg.split, str) else list(dict.fromkeys(cfg.split))
    return "+".join(splits)


def run(args) -> int:
    """``ssd eval CONFIG (--weights CKPT [--weights-kind ema|raw] | --detections FILE) [--split val|train]
    [--metric] [--json] [--plots] [--out-dir]``."""
    cfg = load_config(args.config, args.overrides)
    split = getattr(args, "split", "val")
    data = getattr(cfg.data, split)  # the split scored, with evaluation's transforms
    batch_size = cfg.eval.batch_size if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if args.plots:
        require_matplotlib()  # before minutes of inference
    if args.detections and getattr(args, "weights_kind", None):
        raise ValueError("--weights-kind picks the weights of --weights; --detections runs no model")
    if args.detections:
        if int(os.environ.get("RANK", "0")) != 0:  # nothing to shard: rank 0 does it all
            return 0
        dataset = build_dataset(data, None, train=False, on_error=cfg.data.on_error, key=f"data.{split}")
        evalset = EvalSet(dataset, data.annotations)
        detections = evalset.read_results(args.detections)
    else:
        try:
            threads = getattr(args, "threads", None)
            if threads is not None:
                torch.set_num_threads(threads)
            dataset, predictions = predict_checkpoint(
                cfg, args.weights, args.device, batch_size, getattr(args, "weights_kind", None), split, threads
            )
        finally:
            cleanup()
        if predictions is None:  # not rank 0
            return 0
        evalset = EvalSet(dataset, data.annotations)
        detections = evalset.from_predictions(predictions)

    result = evalset.evaluate(detections, args.metric or cfg.eval.metric, cfg.eval.voc_pixel_convention)
    result = add_coco_ap(evalset, detections, result)
    train_boxes = training_boxes(cfg)
    print(format_table(result, train_boxes))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        extra = {"num_train_boxes": train_boxes} if train_boxes is not None else {}
        Path(args.json).write_text(json.dumps(metrics_json(result) | extra, indent=2) + "\n")
    if args.plots:
        log.info("wrote %d precision/recall plots to %s", len(write_pr_plots(args.plots, result)), args.plots)
    if args.out_dir:
        n = evalset.write_results(Path(args.out_dir) / "detections.json", detections)
        evalset.write_comp4(args.out_dir, split_name(data), detections)
        log.info(
            "wrote %d detections to %s (detections.json, comp4_det_%s_<class>.txt)", n, args.out_dir, split_name(data)
        )
    return 0
