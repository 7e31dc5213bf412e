"""``ssd bn-report``: BatchNorm diagnostics of a checkpoint on its training data (running vs batch
statistics, the train/eval gap, stale and non-finite layers); exit 1 when a layer is flagged."""

from __future__ import annotations

from ssd.checkpoint import model_from_checkpoint
from ssd.config import load_config
from ssd.device import resolve_device
from ssd.engine.bn import bn_layers
from ssd.engine.bn_report import bn_report, format_bn_report, report_setup
from ssd.weights import resolve_weights


def run(args) -> int:
    """``ssd bn-report --weights CKPT --config CFG [key=value ...] [--batches N] [--device D]``.

    Batches come from ``data.train`` through the training transforms (seed ``train.seed``, batch
    ``train.batch_size``) at the checkpoint's input size and preprocessing. Prints the table; exit
    code 0 when every layer is ok, 1 when any is stale or drifted (like ``ssd data check``).
    """
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    cfg = load_config(args.config, args.overrides)
    args.weights = resolve_weights(args.weights)  # a name or URL: its cached file
    model, ckpt = model_from_checkpoint(args.weights)
    if not bn_layers(model):
        raise ValueError(
            f"{args.weights}: the model has no BatchNorm layers (model.batch_norm: none); nothing to report"
        )
    model.to(resolve_device(args.device))
    batches, prepare, criterion = report_setup(cfg, model, ckpt, args.weights, args.config, args.batches)
    report = bn_report(model, batches(cfg.train.seed), prepare, criterion, args.batches)
    title = f"BatchNorm report for {args.weights}: {len(report.layers)} layers, data.train of {args.config}"
    print(format_bn_report(report, title))
    return 1 if report.flagged else 0
