"""What the GPU rows share, and the ``train_loop`` row (``ssd bench --device cuda``).

Model FLOP utilisation (MFU) counts SSD300's forward as 34.86 GMAC = 69.7 GFLOP per image (the conv
MACs the ``predict`` row counts, 91-class heads) and a training step as 3 forwards (forward, and a
backward of twice its cost), against the GPU's dense bf16 tensor-core peak where it is known. The
measured bf16 matmul rate is reported beside it: what the GPU gives a large well-shaped matmul.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path

import torch

# 2 x 34.86 GMAC per image (counted by ssd.bench.model.conv_macs_per_image)
SSD300_FORWARD_GFLOP = 69.7
# forward + backward (the activations' gradients and the weights' gradients, one forward each)
TRAIN_STEP_FORWARDS = 3

# dense bf16 tensor-core peaks (NVIDIA datasheets, TFLOP/s, without sparsity); H100: the SXM part
# ("H100 80GB HBM3"; the PCIe card's 756 is not listed: unknown names report the measured rate only)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "A100": 312.0}


def peak_bf16_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``gpu_name`` (``torch.cuda.get_device_name()``), or None."""
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in gpu_name:
            return peak
    return None


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """The GPU's rate on an ``n`` x ``n`` x ``n`` matmul in ``dtype`` (TFLOP/s), timed with CUDA events
    over ``repeats`` back-to-back products after 3 warm-up ones."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return 2 * n**3 / seconds / 1e12


def train_tflops(images_per_s: float) -> float:
    """Model TFLOP/s of training at ``images_per_s``."""
    return images_per_s * TRAIN_STEP_FORWARDS * SSD300_FORWARD_GFLOP / 1e3


def gpu_report(images_per_s: float, matmul: float) -> dict:
    """The numbers every GPU training row carries: GPU name, model TFLOP/s, MFU (None if the peak is
    unknown) and the measured bf16 matmul rate."""
    name = torch.cuda.get_device_name()
    peak = peak_bf16_tflops(name)
    achieved = train_tflops(images_per_s)
    return {
        "gpu": name,
        "images_per_s": images_per_s,
        "model_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "matmul_bf16_tflops": matmul,
    }


def describe(report: dict) -> str:
    """The report as the row's note: rate, model TFLOP/s, MFU and the matmul rate."""
    mfu = "peak unknown"
    if report["mfu"] is not None:
        mfu = f"MFU {report['mfu']:.1%} of {report['peak_bf16_tflops']:.0f}"
    return (
        f"{report['gpu']}: {report['images_per_s']:.0f} images/s = {report['model_tflops']:.0f} TFLOP/s, "
        f"{mfu}; bf16 matmul {report['matmul_bf16_tflops']:.0f} TFLOP/s"
    )


# --- train_loop ------------------------------------------------------------------------------------


def loop_images_per_s(metrics_path: str | os.PathLike, warmup_rows: int = 1) -> float:
    """Training images/s from a run's ``metrics.jsonl``: the logged training rows after the first
    ``warmup_rows`` (worker start-up, cuDNN's algorithm search), as total images / total time."""
    lines = Path(metrics_path).read_text().splitlines()
    train_rows = [r for r in map(json.loads, filter(str.strip, lines)) if "images_per_s" in r]
    if len(train_rows) <= warmup_rows:
        raise ValueError(f"{metrics_path}: {len(train_rows)} training rows, need more than {warmup_rows}")
    # a row covers the n iterations since the previous one: n * batch images in n * batch / rate
    # seconds, so the total rate is sum(n) / sum(n / rate), whatever the batch
    iters = [0] + [r["iter"] for r in train_rows]
    spans = [b - a for a, b in itertools.pairwise(iters)]
    kept = list(zip(spans, train_rows, strict=True))[warmup_rows:]
    return sum(n for n, _ in kept) / sum(n / r["images_per_s"] for n, r in kept)


def bench_train_loop(repeats: int, iterations: int = 40, batch: int = 32) -> dict:
    """The full training loop (``ssd.engine.train.train``) on the GPU: SSD300 at 300 px, amp bf16,
    channels_last, batch 32, ``iterations`` iterations on a generated shapes dataset (``ssd.data.shapes``),
    loader workers as many as the CPU allows (up to 12). Images/s from ``metrics.jsonl`` after the first
    logged window. No peer: the number to watch is MFU."""
    from ssd.config import Config, DataConfig, DatasetConfig, ModelConfig, TrainConfig
    from ssd.data.shapes import SHAPES_CLASSES, ensure_shapes
    from ssd.engine.train import train

    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    log_period = max(1, iterations // 4)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = ensure_shapes(Path(tmp) / "shapes", 20 * batch, 32, size=300)
        root = str(shapes)
        classes = list(SHAPES_CLASSES)
        cfg = Config(
            model=ModelConfig(num_classes=len(classes) + 1),
            data=DataConfig(
                train=DatasetConfig(root=root, split="train", classes=classes),
                val=DatasetConfig(root=root, split="val", classes=classes),
                num_workers=workers,
            ),
            train=TrainConfig(
                max_iter=iterations,
                batch_size=batch,
                amp="bf16",
                channels_last=True,
                device="cuda",
                log_period=log_period,
                eval_period=10**9,
                checkpoint_period=10**9,
                tensorboard=False,
            ),
        )
        train(cfg, Path(tmp) / "run")
        images_per_s = loop_images_per_s(Path(tmp) / "run" / "metrics.jsonl")
    report = gpu_report(images_per_s, matmul_tflops())
    note = f"{describe(report)}; batch {batch}, {workers} loader workers, iterations {log_period + 1}-{iterations}"
    return {
        "name": "train_loop",
        "ours_s": 1.0 / images_per_s,
        "peer": "none (MFU)",
        "peer_s": None,
        "target": None,
        "batch": batch,
        "num_workers": workers,
        **report,
        "note": note,
    }
