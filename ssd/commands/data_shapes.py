"""``ssd data shapes``: generate the synthetic shapes dataset (VOC tree and COCO JSON of the same images)."""

from __future__ import annotations

import argparse
import logging

from ssd.data.shapes import generate_shapes


def run(args: argparse.Namespace) -> int:
    summary = generate_shapes(
        args.out, args.train, args.val, size=args.size, seed=args.seed, min_side=args.min_side, max_side=args.max_side
    )
    logging.info("wrote the shapes dataset to %s: %s", args.out, summary)
    return 0
