"""``ssd train``: train a detector from a YAML config (one process, or several under torchrun)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ssd.config import load_config
from ssd.engine.step import TrainingError
from ssd.engine.train import train


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"model.init={args.init}"] if args.init else [])
    cfg = load_config(args.config, overrides)
    out = args.output_dir or str(Path("runs") / Path(args.config).stem)
    try:
        summary = train(cfg, out, resume=args.resume)
    except TrainingError as e:  # not a user-input error (exit 2), but one clear line all the same
        print(f"ssd train: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over the signals: nothing trained yet
        print("ssd train: interrupted before training started", file=sys.stderr)
        return 128 + signal.SIGINT
    if summary["stopped"] == "signal":  # the engine logged the stop and where last.pt is; 130 for SIGINT, 143 for
        # SIGTERM, as a shell reports them (a torchrun rank that stopped on another rank's signal: 143)
        return 128 + (signal.Signals[summary["signal"]] if summary["signal"] else signal.SIGTERM)
    best = (
        f"; best mAP {summary['best_map']:.4f} at iteration {summary['best_iter']}" if summary["best_map"] >= 0 else ""
    )
    logging.info("training %s at iteration %d%s; outputs in %s", summary["stopped"], summary["iteration"], best, out)
    return 0
