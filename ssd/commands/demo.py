"""``ssd demo``: the synthetic shapes dataset, a small SSD trained on the CPU, its mAP and drawn detections."""

from __future__ import annotations

import argparse
import signal

from ssd.demo import run_demo


def run(args: argparse.Namespace) -> int:
    metrics = run_demo(args.out, overrides=args.overrides)
    if "stopped" in metrics:  # by a signal: the engine logged it
        return 128 + signal.Signals[metrics["stopped"]]
    print(f"demo: VOC07 mAP@0.5 {metrics['map']:.4f} in {metrics['seconds']:.0f} s; outputs in {args.out}")
    return 0
