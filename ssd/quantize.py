"""int8 ONNX for the CPU: ONNX Runtime's static quantization of an exported fp32 graph, calibrated on images.

ONNX Runtime's ``quantize_static`` (the maintained path; PyTorch is retiring ``torch.ao``) in QDQ format:
per-channel int8 weights, activations calibrated on the given images, the convolutions quantized and the
rest of the graph (input normalisation, L2Norm, box decoding, softmax) left in float; each ReLU is folded
into the uint8 output of its convolution. The settings
(:data:`DEFAULT`) were chosen on trained models: docs/inference.md gives the numbers.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssd.config import PreprocessConfig
from ssd.data.dataset import read_image
from ssd.onnx_model import graph_preprocess, require_onnxruntime
from ssd.preprocess import preprocess_images

log = logging.getLogger("ssd.export")

MIN_INT8_OPSET = 13  # per-channel QDQ (QuantizeLinear with an axis)
QUANTIZED_OPS = ["Conv", "Relu"]  # a ReLU is folded into its conv's uint8 output: ~10% faster than Conv alone
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Int8Settings:
    activations: str = "uint8"  # uint8 | int8
    calibration: str = "minmax"  # minmax | entropy | percentile
    reduce_range: bool = False  # 7-bit weights: for CPUs without VNNI, where u8 x s8 products can saturate
    float_heads: bool = False  # keep the loc / conf head convolutions in float

    def describe(self) -> dict:
        return {"activations": self.activations, "calibration": self.calibration,
                "reduce_range": self.reduce_range, "float_heads": self.float_heads}  # fmt: skip


DEFAULT = Int8Settings()


def calibration_files(records_or_folder: list | Path, count: int) -> list[tuple[str, int | None]]:
    """``(path, EXIF orientation)`` of ``count`` calibration images: a dataset's records (a fixed, seeded
    sample when there are more) or a folder's image files (sorted, then the same sample)."""
    if isinstance(records_or_folder, Path):
        files = sorted(p for p in records_or_folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        items: list[tuple[str, int | None]] = [(str(p), None) for p in files]  # None: upright, as ssd predict reads
        if not items:
            raise ValueError(f"--calib {records_or_folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        items = [(r.path, r.orientation) for r in records_or_folder]
    if len(items) > count:
        chosen = np.sort(np.random.default_rng(0).choice(len(items), size=count, replace=False))
        items = [items[i] for i in chosen]
    return items


def calibration_batches(
    items: Sequence,
    preprocess: PreprocessConfig,
    size: int,
    batch: int,
    read: Callable = lambda item: read_image(*item),
) -> Iterator[np.ndarray]:
    """The graph's input for ``items`` (``(path, orientation)`` pairs; ``read`` turns one into an RGB image):
    float32 ``[batch, 3, size, size]`` 0..255 RGB, resized as the checkpoint resizes (the last batch padded
    by repeating images)."""
    identity = graph_preprocess(preprocess)
    for start in range(0, len(items), batch):
        chunk = list(items[start : start + batch])
        chunk = chunk + chunk[: batch - len(chunk)] if len(chunk) < batch else chunk
        yield preprocess_images([read(item) for item in chunk], identity, size, torch.device("cpu")).numpy()


def quantize_int8(
    fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches: Iterator[np.ndarray], settings: Int8Settings
) -> None:
    """Write the int8 model of ``fp32_path`` to ``out_path``, calibrated on ``batches`` (graph inputs)."""
    require_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibration]  # fmt: skip
    activation = QuantType.QUInt8 if settings.activations == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        exclude = head_convs(prepared) if settings.float_heads else []
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            reduce_range=settings.reduce_range,
            activation_type=activation,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=exclude,
            extra_options={"CalibTensorRangeSymmetric": settings.activations == "int8"},
        )


def head_convs(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv" and "/head/" in n.name]
