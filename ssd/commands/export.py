"""``ssd export``: a checkpoint to ONNX (network and box decoding; NMS optional), with the metadata that
``ssd predict`` / ``ssd eval`` / ``Detector`` read back, checked with onnxruntime against PyTorch where it is
installed; ``--int8``: quantized with ONNX Runtime, calibrated on training images."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from ssd.config import PostprocessConfig
from ssd.export import MAX_OPSET, MIN_OPSET, check_onnx, export_onnx

log = logging.getLogger("ssd.export")


def check_args(args) -> None:
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise ValueError(f"--opset {args.opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    if not args.int8:
        return
    from ssd.quantize import MIN_INT8_OPSET

    if args.opset < MIN_INT8_OPSET:
        raise ValueError(f"--int8 needs --opset >= {MIN_INT8_OPSET} (per-channel int8 weights), got {args.opset}")
    if args.no_fuse:
        raise ValueError("--int8 quantizes the convolutions with BatchNorm folded into them: drop --no-fuse")
    if args.calib_images < 1:
        raise ValueError(f"--calib-images must be >= 1, got {args.calib_images}")


def run(args) -> int:
    """``ssd export --weights CKPT [--weights-kind ema|raw] --out model.onnx [--opset N] [--dynamic-batch] [--nms]
    [--no-fuse] [--int8 [--calib CONFIG|FOLDER] [--calib-images N] [--reduce-range]]``."""
    try:
        import onnx  # noqa: F401  # the exporter writes through it: fail before loading any weights
    except ImportError:
        raise ValueError("ONNX export needs the onnx package: pip install 'ssd[onnx]' (onnx, onnxruntime)") from None
    check_args(args)
    from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
    from ssd.config import from_dict
    from ssd.fuse import fuse_batchnorm
    from ssd.onnx_model import export_metadata, write_metadata
    from ssd.weights import resolve_weights

    args.weights = resolve_weights(args.weights)  # a name or URL: its cached file
    model, ckpt = model_from_checkpoint(args.weights, getattr(args, "weights_kind", None))
    model_cfg = checkpoint_model_config(ckpt, args.weights)
    calib = calibration_source(args, ckpt) if args.int8 else None  # before the export: a missing --calib fails fast
    model.eval()
    folded = 0 if args.no_fuse else fuse_batchnorm(model)
    # a converted checkpoint's own settings, else its training run's (last.pt), else the defaults
    post = ckpt["config"].get("postprocess") or (ckpt.get("full_config") or {}).get("postprocess")
    post_cfg = from_dict(PostprocessConfig, post, "postprocess")
    variances = tuple(model_cfg.priors.variances)
    meta = export_metadata(model_cfg, ckpt["classes"], post_cfg, args.nms, None if args.dynamic_batch else 1)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx" if args.int8 else Path(args.out)
        nms = post_cfg if args.nms else None
        wrapped = export_onnx(model, model_cfg.preprocess, fp32, args.opset, args.dynamic_batch, nms, variances)
        write_metadata(fp32, meta)
        log_export(args, model_cfg.input_size, folded)
        check_against_pytorch(fp32, wrapped, args.dynamic_batch)
        if calib is not None:
            write_int8(args, fp32, calib, model_cfg, meta)
    return 0


def log_export(args, size: int | None, folded: int) -> None:
    outputs = "det_boxes/det_scores/det_labels/det_batch (NMS in the graph)" if args.nms else (
        "boxes [B, P, 4] normalised xyxy, scores [B, P, C]"
    )  # fmt: skip
    log.info(
        "wrote %s: input images [%s, 3, %d, %d] RGB 0..255, outputs %s (opset %d%s)",
        args.out, "batch" if args.dynamic_batch else 1, size, size, outputs, args.opset,
        f", {folded} BatchNorms folded" if folded else "",
    )  # fmt: skip


def check_against_pytorch(path: Path, wrapped, dynamic_batch: bool) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        import onnx

        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        log.info("onnx.checker passed; onnxruntime is not installed, so outputs were not compared with PyTorch")
        return
    diffs = check_onnx(path, wrapped, batch_size=2 if dynamic_batch else 1)
    summary = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    if max(diffs.values()) > 1e-4:
        log.warning("onnxruntime and PyTorch differ by more than 1e-4: %s", summary)
    else:
        log.info("onnx.checker passed; onnxruntime vs PyTorch max abs difference: %s", summary)


def calibration_source(args, ckpt: dict) -> list | Path:
    """``--calib`` (a config: its ``data.train``; or a folder of images), else the checkpoint's own training
    data (``full_config``, which ``last.pt`` has). Never the validation split."""
    from ssd.config import Config, from_dict, load_config
    from ssd.data.dataset import build_dataset

    if args.calib is not None:
        calib = Path(args.calib)
        if calib.is_dir():
            return calib
        if not calib.is_file():
            raise FileNotFoundError(f"--calib {calib}: no such config or folder of images")
        data, where = load_config(calib).data.train, f"--calib {calib}: data.train"
    elif ckpt.get("full_config"):
        data, where = (
            from_dict(Config, ckpt["full_config"]).data.train,
            f"{args.weights}: its training config's data.train",
        )
    else:
        raise ValueError(
            f"--int8 needs --calib (a config whose data.train, or a folder of images): {args.weights} carries no "
            "training config (best.pt and converted checkpoints do not; last.pt does)"
        )
    log.info("calibrating on %s", where)
    return build_dataset(data, None, train=False, key=where).records


def write_int8(args, fp32: Path, calib: list | Path, model_cfg, meta: dict) -> None:
    from ssd.device import cpu_has_vnni
    from ssd.onnx_model import write_metadata
    from ssd.quantize import DEFAULT, calibration_batches, calibration_files, quantize_int8

    settings = dataclasses.replace(DEFAULT, reduce_range=bool(args.reduce_range))
    files = calibration_files(calib, args.calib_images)
    batch = meta["batch"] or 8
    quantize_int8(
        fp32, args.out, calibration_batches(files, model_cfg.preprocess, model_cfg.input_size, batch), settings
    )
    write_metadata(args.out, meta | {"int8": settings.describe() | {"calibration_images": len(files)}})
    mib = lambda p: Path(p).stat().st_size / 2**20  # noqa: E731
    log.info("wrote %s: int8, calibrated on %d images (%.1f MiB; fp32 %.1f MiB)", args.out, len(files),
             mib(args.out), mib(fp32))  # fmt: skip
    if cpu_has_vnni() is False and not args.reduce_range:
        log.warning("this CPU has no VNNI: int8 products can saturate here; --reduce-range avoids it")
