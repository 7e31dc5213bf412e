"""Bench row ``predict_int8``: our int8 ONNX model (``ssd export --int8``, run by ``Detector``) against
torchvision's fp32 SSD300, end to end on decoded images, with our fp32 figure beside it; and the int8
model's detections checked against fp32 on a tiny model trained in the row."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ssd.bench.augment import decode_rgb, synthetic_jpegs
from ssd.bench.model import scaled_torchvision_ssd300
from ssd.bench.timing import best_interleaved
from ssd.device import cpu_has_vnni

TARGET = 3.0  # x torchvision fp32, on CPUs with VNNI


def export_both(ckpt: Path, out: Path, batch: int, calib: list[np.ndarray] | Path) -> tuple[Path, Path]:
    """fp32 and int8 ``.onnx`` of ``ckpt`` with a fixed ``batch``; int8 calibrated on ``calib`` (images or
    a folder), as ``ssd export`` does."""
    from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
    from ssd.config import PostprocessConfig
    from ssd.export import export_onnx
    from ssd.fuse import fuse_batchnorm
    from ssd.onnx_model import export_metadata, write_metadata
    from ssd.quantize import DEFAULT, calibration_batches, calibration_files, quantize_int8

    model, ckpt_dict = model_from_checkpoint(ckpt)
    cfg = checkpoint_model_config(ckpt_dict)
    model.eval()
    fuse_batchnorm(model)
    fp32, int8 = out / "fp32.onnx", out / "int8.onnx"
    export_onnx(model, cfg.preprocess, fp32, 17, False, None, tuple(cfg.priors.variances), batch_size=batch)
    meta = export_metadata(cfg, ckpt_dict["classes"], PostprocessConfig(), False, batch)
    write_metadata(fp32, meta)
    size = int(model.input_size)
    if isinstance(calib, Path):
        batches = calibration_batches(calibration_files(calib, 200), cfg.preprocess, size, batch)
    else:  # decoded images
        batches = calibration_batches(calib, cfg.preprocess, size, batch, read=lambda image: image)
    quantize_int8(fp32, int8, batches, DEFAULT)
    write_metadata(int8, meta)
    return fp32, int8


def trained_overlap(tmp: Path) -> float:
    """A tiny SSD trained to confidence on 8 shapes images: the fraction of its fp32 detections (score >= 0.5)
    that the int8 model has too (same label, IoU >= 0.9)."""
    from ssd.config import Config, from_dict
    from ssd.data.dataset import read_image
    from ssd.data.shapes import generate_shapes
    from ssd.engine.train import train
    from ssd.inference import Detector

    generate_shapes(tmp / "shapes", 8, 2, size=64, seed=3, min_side=0.3, max_side=0.6, max_objects=2)
    ds = {"format": "voc", "root": str(tmp / "shapes"), "classes": ["circle", "square", "triangle", "star"]}
    cfg = {"model": {"num_classes": 5, "input_size": 64, "width": 0.125, "batch_norm": "all", "dropout": 0.0,
                     "extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}],
                     "priors": {"scales": [0.3, 0.5, 0.7, 0.9, 1.05]}},
           "data": {"train": {**ds, "split": "train"}, "val": {**ds, "split": "val"}, "num_workers": 0,
                    "augment": {"photometric_p": 0, "channel_swap_p": 0, "expand_p": 0, "crop_min_ious": [None],
                                "flip_p": 0}},
           "train": {"max_iter": 150, "batch_size": 8, "warmup_iters": 0, "device": "cpu", "optimizer": "adamw",
                     "lr": 0.01, "checkpoint_period": 150, "eval_period": 150, "log_period": 150},
           "eval": {"train_sample": 0}}  # fmt: skip
    quiet = logging.getLogger("ssd")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        train(from_dict(Config, cfg), tmp / "run")
    finally:
        quiet.setLevel(level)
    (tmp / "tiny").mkdir()
    fp32, int8 = export_both(tmp / "run" / "last.pt", tmp / "tiny", 1, tmp / "shapes" / "JPEGImages")
    images = [read_image(str(p)) for p in sorted((tmp / "shapes" / "JPEGImages").glob("train_*.jpg"))]
    ref, got = (Detector.from_onnx(p, score_thresh=0.05).predict_batch(images) for p in (fp32, int8))
    return matched_fraction(ref, got)


def matched_fraction(reference: list[dict], got: list[dict], min_score: float = 0.5, min_iou: float = 0.9) -> float:
    """The fraction of ``reference``'s detections scoring >= ``min_score`` that ``got`` has too: the same
    label and IoU >= ``min_iou`` (how int8 detections are judged against fp32's)."""
    from ssd.ops.boxes import box_iou

    found = total = 0
    for r, g in zip(reference, got, strict=True):
        keep = r["scores"] >= min_score
        for box, label in zip(r["boxes"][keep], r["labels"][keep], strict=True):
            same = g["labels"] == label
            total += 1
            found += bool(same.any() and box_iou(box[None], g["boxes"][same]).max() >= min_iou)
    return found / max(total, 1)


def bench_predict_int8(repeats: int) -> dict:
    """SSD300 (91 classes), batch 8, 500x375 decoded images -> detections, per image: our int8 model
    (calibrated on 16 other images) against torchvision's fp32 ``ssd300_vgg16`` and our fp32 ``Detector``,
    the same thread count on every side, interleaved rounds."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"name": "predict_int8", "ours_s": float("nan"), "peer": "skipped: onnxruntime is not installed "
                "(pip install 'ssd[onnx]')", "peer_s": None}  # fmt: skip
    from ssd.checkpoint import save_checkpoint
    from ssd.convert import convert_torchvision
    from ssd.inference import Detector

    tv = scaled_torchvision_ssd300()
    images = [decode_rgb(b) for b, _, _ in synthetic_jpegs(8, seed=1)]
    calib = [decode_rgb(b) for b, _, _ in synthetic_jpegs(16, seed=2)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tv.pt"
        save_checkpoint(convert_torchvision(tv.state_dict()), path)
        ours_fp32 = Detector.from_checkpoint(path, device="cpu", score_thresh=0.01, batch_size=8)
        _, int8_path = export_both(path, Path(tmp), 8, calib)
        int8 = Detector.from_onnx(int8_path, score_thresh=0.01, batch_size=8)
        overlap = trained_overlap(Path(tmp))
        size_mib = int8_path.stat().st_size / 2**20

    def peer():
        with torch.inference_mode():
            return tv([torch.from_numpy(im).permute(2, 0, 1).float().div_(255.0) for im in images])

    t = best_interleaved({"int8": lambda: int8.predict_batch(images), "peer": peer,
                          "fp32": lambda: ours_fp32.predict_batch(images)},
                         max(3, repeats // 2))  # fmt: skip
    per_image = {k: v / len(images) for k, v in t.items()}
    vnni = cpu_has_vnni()
    note = (
        f"our fp32 {per_image['fp32'] * 1e3:.0f} ms/image ({per_image['peer'] / per_image['fp32']:.2f}x); int8 model "
        f"{size_mib:.1f} MiB; {torch.get_num_threads()} threads each; CPU VNNI: {vnni}; trained tiny model: "
        f"{overlap:.0%} of fp32 detections (score >= 0.5) found in int8 (same label, IoU >= 0.9)"
    )
    if not vnni:
        note += "; the >= 3x target is for CPUs with VNNI: not measured against it here"
    assert overlap >= 0.9, f"int8 lost its detections: {note}"
    return {
        "name": "predict_int8",
        "ours_s": per_image["int8"],
        "peer": "torchvision 0.29 ssd300_vgg16 fp32, batch 8",
        "peer_s": per_image["peer"],
        "target": TARGET if vnni else None,
        "ours_fp32_s": per_image["fp32"],
        "vnni": vnni,
        "int8_overlap": overlap,
        "note": note,
    }
