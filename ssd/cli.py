"""``ssd <command>``: the parser. Each command's handler is ``run(args)`` in its own module of
:mod:`ssd.commands`, imported only when that command runs, so ``--help`` and argument errors answer
without loading torch. User-input errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ssd import __version__

# the choices the parser offers; tests check them against ssd.checkpoint.WEIGHTS_KINDS and
# ssd.engine.bn_report.DEFAULT_BATCHES, which live beside torch
WEIGHTS_KINDS = ("ema", "raw")
BN_REPORT_BATCHES = 8
WEIGHTS_KIND_HELP = (
    "which weights of a checkpoint trained with train.ema: its moving average (ema) or the trained weights "
    "(raw); default: the ones its logged mAP belongs to (ema when it has them)"
)
DEVICE_HELP = "auto (CUDA if present), cpu, cuda, cuda:1, ..."
THREADS_HELP = "CPU threads for PyTorch and ONNX Runtime (default: PyTorch's, i.e. the cores or OMP_NUM_THREADS)"


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help already states it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def command(sub, name: str, module: str, help: str, description: str = "") -> argparse.ArgumentParser:
    """A subcommand whose handler is ``ssd.commands.<module>.run``; its help starts with a description line."""
    p = sub.add_parser(
        name, help=help, description=description or help[0].upper() + help[1:] + ".", formatter_class=HelpFormatter
    )
    p.set_defaults(module=module)
    return p


def add_overrides(p: argparse.ArgumentParser, example: str = "train.lr=0.002") -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted config overrides, e.g. {example}")


def add_training_commands(sub) -> None:
    p = command(sub, "train", "train", "train a detector from a YAML config (torchrun for several GPUs/machines)")
    p.add_argument("config", help="YAML config, e.g. configs/ssd300_vgg16_voc0712.yaml")
    add_overrides(p)
    p.add_argument("--output-dir", help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt with the run's own settings")
    p.add_argument("--init", help="fine-tune from this checkpoint (same as model.init=PATH)")

    p = command(
        sub, "demo", "demo", "train a small SSD on the synthetic shapes dataset on the CPU and show its detections"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (dataset, run, metrics.json, detections)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of configs/shapes_tiny.yaml")

    p = command(
        sub,
        "convert",
        "convert",
        "convert torchvision / ssd.pytorch / lufficc / ImageNet VGG weights to an ssd checkpoint",
    )
    p.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=["torchvision", "amdegroot", "lufficc", "vgg16", "vgg16_bn"],
        help="layout of SRC: torchvision ssd300_vgg16, amdegroot ssd.pytorch, lufficc SSD, "
        "or ImageNet vgg16/vgg16_bn (backbone init)",
    )
    p.add_argument("src", help="source weights file (.pth state_dict)")
    p.add_argument("--out", required=True, help="destination checkpoint (.pt)")


def add_model_commands(sub) -> None:
    p = command(
        sub,
        "eval",
        "eval",
        "evaluate a checkpoint or a detections file on data.val or data.train (VOC07 / VOC / COCO metrics)",
    )
    p.add_argument("config", help="YAML config whose data.val (or --split train: data.train) is evaluated")
    add_overrides(p, "data.val.root=/data/VOC")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="checkpoint (or exported .onnx, name, URL) to run on the split")
    src.add_argument(
        "--detections", help="existing detections in COCO results format (JSON list) instead of running a model"
    )
    p.add_argument("--weights-kind", choices=WEIGHTS_KINDS, help=WEIGHTS_KIND_HELP)
    p.add_argument(
        "--split",
        choices=["val", "train"],
        default="val",
        help="the dataset scored: data.val, or data.train (its images with evaluation's transforms: "
        "a model that cannot score its own training images has a data or capacity problem)",
    )
    p.add_argument(
        "--metric",
        choices=["voc07", "voc", "coco"],
        help="default: eval.metric, else voc07 for VOC data and coco for COCO data",
    )
    p.add_argument("--json", help="write the metrics (map, per_class, and COCO's 12 numbers) to this JSON file")
    p.add_argument("--plots", metavar="DIR", help="write a precision/recall curve per class as PNG (needs matplotlib)")
    p.add_argument(
        "--out-dir", help="write detections.json (COCO results) and VOC devkit comp4_det_<split>_<class>.txt files here"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, help="images per forward (default: eval.batch_size)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)

    p = command(sub, "predict", "predict", "detect objects in images, folders and videos; draw them and write JSON")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) and video files"
    )
    p.add_argument(
        "--weights", required=True, help="checkpoint (trained here or converted), exported .onnx, weights name or URL"
    )
    p.add_argument("--weights-kind", choices=WEIGHTS_KINDS, help=WEIGHTS_KIND_HELP)
    p.add_argument("--out", help="write annotated images / videos here")
    p.add_argument("--json", help="write the detections (original-image pixels) to this JSON file")
    p.add_argument("--score-thresh", type=float, default=0.3, help="drop detections below this score")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument(
        "--no-fuse", action="store_true", help="keep BatchNorm layers instead of folding them into the convs"
    )

    p = command(sub, "export", "export", "export a checkpoint to ONNX (network + box decoding; NMS optional)")
    p.add_argument("--weights", required=True, help="checkpoint to export")
    p.add_argument("--weights-kind", choices=WEIGHTS_KINDS, help=WEIGHTS_KIND_HELP)
    p.add_argument("--out", required=True, help="destination .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--nms", action="store_true", help="include per-class NMS in the graph (see docs/inference.md)")
    p.add_argument(
        "--no-fuse", action="store_true", help="keep BatchNorm layers instead of folding them into the convs"
    )
    p.add_argument("--int8", action="store_true", help="int8 model for the CPU (ONNX Runtime static quantization)")
    p.add_argument(
        "--calib",
        help="--int8's calibration images: a config (its data.train) or a folder; "
        "default: the checkpoint's own training data (last.pt carries it)",
    )
    p.add_argument("--calib-images", type=int, default=200, help="calibration images (a fixed sample)")
    p.add_argument("--reduce-range", action="store_true", help="7-bit int8 weights: for CPUs without VNNI (saturation)")

    p = command(
        sub,
        "bn-report",
        "bn_report",
        "BatchNorm diagnostics: running vs batch statistics, train/eval gap, stale layers",
    )
    p.add_argument("--weights", required=True, help="checkpoint of a model with BatchNorm")
    p.add_argument("--config", required=True, help="YAML config whose data.train provides the batches")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--batches", type=int, default=BN_REPORT_BATCHES, help="training batches to measure")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)

    # no -h of its own: ``ssd bench --help`` reaches the bench's parser, which lists its options and rows
    p = sub.add_parser(
        "bench",
        help="side-by-side speed against the peer implementations (same as scripts/bench.py)",
        add_help=False,
        prefix_chars="+",
    )
    p.set_defaults(module="bench")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)


def add_data_commands(sub) -> None:
    data = sub.add_parser(
        "data",
        help="dataset tools: generate the synthetic shapes set, validate a dataset, fit the priors",
        description="Dataset tools: generate the synthetic shapes set, validate a dataset, fit the priors.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = command(
        data_sub,
        "shapes",
        "data_shapes",
        "generate the synthetic shapes dataset (VOC tree + COCO JSON of the same images)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=300, help="validation images")
    p.add_argument("--size", type=int, default=300, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same images")
    p.add_argument("--min-side", type=float, default=0.08, help="smallest object side, a fraction of the image side")
    p.add_argument("--max-side", type=float, default=0.60, help="largest object side, a fraction of the image side")

    p = command(
        data_sub,
        "check",
        "data_check",
        "validate a dataset (files, boxes, classes) and the model's prior coverage; exit 1 on problems",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument(
        "--split",
        nargs="+",
        choices=["train", "val"],
        default=["train", "val"],
        help="which of data.train / data.val to check",
    )
    p.add_argument("--no-images", action="store_true", help="skip decoding every image (faster; header checks only)")
    p.add_argument("--all", action="store_true", help="list every problem and every repaired file, not one per kind")

    p = command(
        data_sub,
        "fit-priors",
        "data_fit_priors",
        "fit the prior sizes (and, if needed, the input size) to data.train's boxes; write a config",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides (kept in the written config)"
    )
    p.add_argument("--out", help="the config to write (default: CONFIG's name + _fitted.yaml, beside it)")
    p.add_argument(
        "--max-input",
        type=int,
        help="largest input size to try when sizes alone stay below 90%% coverage "
        "(multiples of 32; default 2 x model.input_size)",
    )
    p.add_argument("--keep-input", action="store_true", help="keep model.input_size; fit the priors only")


def add_weights_commands(sub) -> None:
    weights = sub.add_parser(
        "weights",
        help="published weights by name (torchvision:NAME): list them",
        description="Published weights by name: --weights, model.init, model.init_backbone and ssd convert take "
        "torchvision:NAME or an http(s):// / file:// URL, downloaded, checked and converted once into the cache.",
    )
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="WEIGHTS_COMMAND")
    command(weights_sub, "list", "weights", "the names, their sources, what each expects, and what is cached")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="SSD object detectors: train, evaluate, predict, convert.")
    parser.add_argument("--version", action="version", version=f"ssd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_training_commands(sub)
    add_model_commands(sub)
    add_data_commands(sub)
    add_weights_commands(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args`` that also takes ``key=value`` overrides after options: argparse stops filling
    a ``nargs="*"`` positional at the first option, so ``ssd train CFG --output-dir D train.lr=0.1``
    would otherwise fail with "unrecognized arguments"."""
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "bench_args"):  # everything after ``ssd bench`` belongs to the bench's own parser
        args.bench_args = rest + list(args.bench_args)
        return args
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(build_parser(), argv)
    handler = importlib.import_module(f"ssd.commands.{args.module}")
    from ssd.checkpoint import CheckpointError
    from ssd.config import ConfigError
    from ssd.data.records import DatasetError

    try:
        return handler.run(args)
    except (ConfigError, CheckpointError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"ssd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
