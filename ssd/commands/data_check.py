"""``ssd data check``: validate a dataset (files, boxes, classes, EXIF orientation) and the priors'
coverage of its boxes; exit 1 on problems."""

from __future__ import annotations

import argparse

from ssd.config import load_config
from ssd.data.check import check_dataset, format_report
from ssd.engine.finetune import adopt_source_config
from ssd.priorfit import coverage_function


def run(args: argparse.Namespace) -> int:
    cfg = adopt_source_config(load_config(args.config, args.overrides))  # the priors a fine-tuning run trains with
    reports = check_dataset(cfg, args.split, decode_images=not args.no_images, coverage=coverage_function(cfg))
    for report in reports:
        print(format_report(report, every=args.all))
    return 0 if all(r.ok for r in reports) else 1
