"""``ssd convert``: torchvision / ssd.pytorch / lufficc / ImageNet VGG weights to an ssd checkpoint."""

from __future__ import annotations

import argparse
import logging

from ssd.checkpoint import save_checkpoint
from ssd.convert import convert_file
from ssd.weights import raw_weights


def run(args: argparse.Namespace) -> int:
    ckpt = convert_file(args.source_format, raw_weights(args.src))  # a name or URL: the published file, cached
    save_checkpoint(ckpt, args.out)
    cfg = ckpt["config"]["model"]
    kind = ckpt.get("kind", "detector")
    logging.info(
        "wrote %s: %s %s, %d classes, %d tensors, input %s %s",
        args.out,
        ckpt["source"],
        kind,
        cfg["num_classes"],
        len(ckpt["model"]),
        cfg["preprocess"]["channel_order"].upper(),
        cfg["input_size"],
    )
    return 0
