"""``ssd <command>``: parse arguments, build, call. User-input errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from ssd import __version__
from ssd.checkpoint import CheckpointError, save_checkpoint
from ssd.config import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def cmd_convert(args: argparse.Namespace) -> int:
    from ssd.convert import convert_file

    ckpt = convert_file(args.source_format, args.src)
    save_checkpoint(ckpt, args.out)
    cfg = ckpt["config"]["model"]
    kind = ckpt.get("kind", "detector")
    logging.info(
        "wrote %s: %s %s, %d classes, %d tensors, input %s %s", args.out, ckpt["source"], kind,
        cfg["num_classes"], len(ckpt["model"]), cfg["preprocess"]["channel_order"].upper(), cfg["input_size"],
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="SSD object detectors: train, evaluate, predict, convert.")
    parser.add_argument("--version", action="version", version=f"ssd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert torchvision / ssd.pytorch / lufficc / ImageNet VGG weights to an ssd checkpoint")
    p.add_argument("--from", dest="source_format", required=True, choices=["torchvision", "amdegroot", "lufficc", "vgg16", "vgg16_bn"],
                   help="layout of SRC: torchvision ssd300_vgg16, amdegroot ssd.pytorch, lufficc SSD, or ImageNet vgg16/vgg16_bn (backbone init)")  # fmt: skip
    p.add_argument("src", help="source weights file (.pth state_dict)")
    p.add_argument("--out", required=True, help="destination checkpoint (.pt)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"ssd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
