"""``ssd export``: a checkpoint to ONNX (network and box decoding; NMS optional), checked with onnxruntime
against PyTorch where it is installed."""

from __future__ import annotations

import logging

from ssd.config import PostprocessConfig
from ssd.export import MAX_OPSET, MIN_OPSET, check_onnx, export_onnx

log = logging.getLogger("ssd.export")


def run(args) -> int:
    """``ssd export --weights CKPT [--weights-kind ema|raw] --out model.onnx [--opset N] [--dynamic-batch] [--nms]
    [--no-fuse]``."""
    try:
        import onnx  # the exporter writes through it: fail before loading any weights
    except ImportError:
        raise ValueError("ONNX export needs the onnx package: pip install 'ssd[onnx]' (onnx, onnxruntime)") from None
    from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
    from ssd.config import from_dict
    from ssd.fuse import fuse_batchnorm

    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise ValueError(f"--opset {args.opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    from ssd.weights import resolve_weights

    args.weights = resolve_weights(args.weights)  # a name or URL: its cached file
    model, ckpt = model_from_checkpoint(args.weights, getattr(args, "weights_kind", None))
    model_cfg = checkpoint_model_config(ckpt, args.weights)
    model.eval()
    folded = 0 if args.no_fuse else fuse_batchnorm(model)
    post = from_dict(PostprocessConfig, ckpt["config"].get("postprocess"), "postprocess") if args.nms else None
    variances = tuple(model_cfg.priors.variances)
    wrapped = export_onnx(model, model_cfg.preprocess, args.out, args.opset, args.dynamic_batch, post, variances)
    size = model_cfg.input_size
    outputs = (
        "det_boxes/det_scores/det_labels/det_batch (NMS in the graph)"
        if args.nms
        else "boxes [B, P, 4] normalised xyxy, scores [B, P, C]"
    )
    log.info(
        "wrote %s: input images [%s, 3, %d, %d] RGB 0..255, outputs %s (opset %d%s)",
        args.out,
        "batch" if args.dynamic_batch else 1,
        size,
        size,
        outputs,
        args.opset,
        f", {folded} BatchNorms folded" if folded else "",
    )
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        import onnx

        onnx.checker.check_model(onnx.load(str(args.out)), full_check=True)
        log.info("onnx.checker passed; onnxruntime is not installed, so outputs were not compared with PyTorch")
        return 0
    diffs = check_onnx(args.out, wrapped, batch_size=2 if args.dynamic_batch else 1)
    summary = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    if max(diffs.values()) > 1e-4:
        log.warning("onnxruntime and PyTorch differ by more than 1e-4: %s", summary)
    else:
        log.info("onnx.checker passed; onnxruntime vs PyTorch max abs difference: %s", summary)
    return 0
