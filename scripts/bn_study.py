"""The BatchNorm study: train the same detector with BN in different places and at different learning
rates, same seed and data, and compare (loss, mAP, divergence, activations).

    python scripts/bn_study.py configs/shapes_tiny.yaml [--out DIR] [--iters N] [--optimizer sgd|adamw|config]
        [--lr BASE] [--variants none all+heads@lr0.05 all@3x ...] [key=value ...]

Writes DIR/loss.png, map.png, lr_sweep.png, activations.png, summary.json, summary.md and runs/<variant>/.
The defaults: SGD (momentum and weight decay from the config) at lr 0.002 / 0.01 / 0.04 for no BN and
0.01 / 0.04 / 0.16 for BN in every feature block (`all`) and in the heads too (`all+heads`), 300
iterations of the config's batch (16 for configs/shapes_tiny.yaml) on the shapes dataset, generated when
absent: 473 s on 2 quiet CPU cores. See docs/bn_study.md and ssd/studies/bn_study.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ssd.checkpoint import CheckpointError
from ssd.config import BN_BLOCKS, OPTIMIZERS, ConfigError
from ssd.data.records import DatasetError
from ssd.studies.bn_study import DEFAULT_OPTIMIZER, DEFAULT_VARIANTS, VARIANT_HELP, run_study
from ssd.studies.bn_study_report import format_table

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FileNotFoundError, ValueError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bn_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config of the detector to study, e.g. configs/shapes_tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides applied to every variant")
    p.add_argument("--out", default="runs/bn_study", help="output folder (default runs/bn_study)")
    p.add_argument("--iters", type=int, default=300, help="training iterations per variant (default 300)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        metavar="VARIANT",
        help=VARIANT_HELP.format(blocks=", ".join(BN_BLOCKS)) + " (default: %(default)s)",
    )
    p.add_argument(
        "--optimizer",
        choices=[*OPTIMIZERS, "config"],
        default=DEFAULT_OPTIMIZER,
        help="train every variant with this optimizer; config: the config's train.optimizer (default: "
        "%(default)s, as the default variants' lrs are SGD lrs). SGD uses the config's train.momentum "
        "and train.weight_decay",
    )
    p.add_argument("--lr", type=float, help="the base lr that @3x multiplies (default: the config's train.lr)")
    p.add_argument(
        "--eval-period", type=int, default=100, help="evaluate every N iterations (default 100; and at the end)"
    )
    p.add_argument("--log-period", type=int, default=5, help="average the logged loss over N iterations (default 5)")
    p.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    p.add_argument(
        "--val-images", type=int, default=100, help="evaluate on the first N images of data.val (0: all; default 100)"
    )
    p.add_argument(
        "--act-images", type=int, default=16, help="training images in the fixed batch of the activation histograms"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, rest = build_parser().parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]  # overrides may also follow the options
    if stray:
        build_parser().error(f"unrecognized arguments: {' '.join(stray)}")
    variants = [v for v in args.variants if "=" not in v]  # key=value after --variants are overrides
    overrides = [*args.overrides, *(v for v in args.variants if "=" in v), *rest]
    try:
        summary = run_study(
            args.config,
            args.out,
            overrides,
            variants,
            args.iters,
            args.eval_period,
            args.log_period,
            args.batch_size,
            args.val_images,
            args.act_images,
            None if args.optimizer == "config" else args.optimizer,
            args.lr,
        )
    except USER_ERRORS as e:
        print(f"bn_study.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"bn_study.py: interrupted: {e}" if str(e) else "bn_study.py: interrupted", file=sys.stderr)
        return 130
    print(format_table(summary))
    print(f"\nplots and summary in {args.out} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
