"""``ssd <command>``: parse arguments, build, call. User-input errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ssd import __version__
from ssd.checkpoint import WEIGHTS_KINDS, CheckpointError, save_checkpoint
from ssd.config import ConfigError, load_config
from ssd.data.records import DatasetError
from ssd.engine.bn_report import DEFAULT_BATCHES

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FileNotFoundError, ValueError)
WEIGHTS_KIND_HELP = (
    "which weights of a checkpoint trained with train.ema: its moving average (ema) or the trained weights "
    "(raw); default: the ones its logged mAP belongs to (ema when it has them)"
)


def cmd_convert(args: argparse.Namespace) -> int:
    from ssd.convert import convert_file

    ckpt = convert_file(args.source_format, args.src)
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


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from ssd.data.shapes import generate_shapes

    summary = generate_shapes(
        args.out, args.train, args.val, size=args.size, seed=args.seed, min_side=args.min_side, max_side=args.max_side
    )
    logging.info("wrote the shapes dataset to %s: %s", args.out, summary)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ssd.data.check import check_dataset, format_report
    from ssd.engine.finetune import adopt_source_config
    from ssd.priorfit import coverage_function

    cfg = adopt_source_config(load_config(args.config, args.overrides))  # the priors a fine-tuning run trains with
    reports = check_dataset(cfg, args.split, decode_images=not args.no_images, coverage=coverage_function(cfg))
    for report in reports:
        print(format_report(report, every=args.all))
    return 0 if all(r.ok for r in reports) else 1


def cmd_data_fit_priors(args: argparse.Namespace) -> int:
    from ssd.priorfit_command import run_fit_priors_command

    return run_fit_priors_command(args)


def cmd_train(args: argparse.Namespace) -> int:
    from ssd.engine.step import TrainingError
    from ssd.engine.train import train

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


def cmd_demo(args: argparse.Namespace) -> int:
    from ssd.demo import run_demo

    metrics = run_demo(args.out, overrides=args.overrides)
    if "stopped" in metrics:  # by a signal: the engine logged it
        return 128 + signal.Signals[metrics["stopped"]]
    print(f"demo: VOC07 mAP@0.5 {metrics['map']:.4f} in {metrics['seconds']:.0f} s; outputs in {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ssd.engine.evaluate import run_eval_command

    return run_eval_command(args)


def cmd_predict(args: argparse.Namespace) -> int:
    from ssd.inference import run_predict_command

    return run_predict_command(args)


def cmd_export(args: argparse.Namespace) -> int:
    from ssd.export import run_export_command

    return run_export_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from ssd.bench import main as bench_main

    return bench_main(args.bench_args)


def cmd_bn_report(args: argparse.Namespace) -> int:
    from ssd.engine.bn import run_bn_report_command

    return run_bn_report_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="SSD object detectors: train, evaluate, predict, convert.")
    parser.add_argument("--version", action="version", version=f"ssd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a detector from a YAML config (torchrun for several GPUs/machines)")
    p.add_argument("config", help="YAML config, e.g. configs/ssd300_vgg16_voc0712.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lr=0.002")
    p.add_argument("--output-dir", help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    p.add_argument("--init", help="fine-tune from this checkpoint (same as model.init=PATH)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "demo", help="train a small SSD on the synthetic shapes dataset on the CPU and show its detections"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (dataset, run, metrics.json, detections)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of configs/shapes_tiny.yaml")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "convert", help="convert torchvision / ssd.pytorch / lufficc / ImageNet VGG weights to an ssd checkpoint"
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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or a detections file on data.val (VOC07 / VOC / COCO metrics)"
    )
    p.add_argument("config", help="YAML config whose data.val is evaluated")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.val.root=/data/VOC"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="checkpoint to run on data.val")
    src.add_argument(
        "--detections", help="existing detections in COCO results format (JSON list) instead of running a model"
    )
    p.add_argument("--weights-kind", choices=WEIGHTS_KINDS, help=WEIGHTS_KIND_HELP)
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
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, help="default: eval.batch_size")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images, folders and videos; draw them and write JSON")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) and video files"
    )
    p.add_argument("--weights", required=True, help="checkpoint (trained here or converted with ssd convert)")
    p.add_argument("--weights-kind", choices=WEIGHTS_KINDS, help=WEIGHTS_KIND_HELP)
    p.add_argument("--out", help="write annotated images / videos here")
    p.add_argument("--json", help="write the detections (original-image pixels) to this JSON file")
    p.add_argument("--score-thresh", type=float, default=0.3, help="drop detections below this score (default 0.3)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--no-fuse", action="store_true", help="keep BatchNorm layers instead of folding them into the convs"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (network + box decoding; NMS optional)")
    p.add_argument("--weights", required=True, help="checkpoint to export")
    p.add_argument("--weights-kind", choices=WEIGHTS_KINDS, help=WEIGHTS_KIND_HELP)
    p.add_argument("--out", required=True, help="destination .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--nms", action="store_true", help="include per-class NMS in the graph (see docs/inference.md)")
    p.add_argument(
        "--no-fuse", action="store_true", help="keep BatchNorm layers instead of folding them into the convs"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="side-by-side speed against the peer implementations (same as scripts/bench.py)")
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="arguments of scripts/bench.py: --only ROW..., --json OUT, --repeats N, --device cpu|cuda",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bn-report", help="BatchNorm diagnostics: running vs batch statistics, train/eval gap, stale layers"
    )
    p.add_argument("--weights", required=True, help="checkpoint of a model with BatchNorm")
    p.add_argument("--config", required=True, help="YAML config whose data.train provides the batches")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument(
        "--batches", type=int, default=DEFAULT_BATCHES, help=f"training batches to measure (default {DEFAULT_BATCHES})"
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bn_report)

    data = sub.add_parser("data", help="dataset tools: generate the synthetic shapes set, validate a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser(
        "shapes", help="generate the synthetic shapes dataset (VOC tree + COCO JSON of the same images)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=300, help="validation images")
    p.add_argument("--size", type=int, default=300, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-side", type=float, default=0.08, help="smallest object side, a fraction of the image side (default 0.08)"
    )
    p.add_argument(
        "--max-side", type=float, default=0.60, help="largest object side, a fraction of the image side (default 0.60)"
    )
    p.set_defaults(func=cmd_data_shapes)
    p = data_sub.add_parser(
        "check", help="validate a dataset (files, boxes, classes) and the model's prior coverage; exit 1 on problems"
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--split", nargs="+", choices=["train", "val"], default=["train", "val"])
    p.add_argument("--no-images", action="store_true", help="skip decoding every image (faster; header checks only)")
    p.add_argument("--all", action="store_true", help="list every problem and every repaired file, not one per kind")
    p.set_defaults(func=cmd_data_check)
    p = data_sub.add_parser(
        "fit-priors", help="fit the prior sizes (and, if needed, the input size) to data.train's boxes; write a config"
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
    p.set_defaults(func=cmd_data_fit_priors)
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
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"ssd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
