"""Evaluation: inference over a dataset (sharded across ranks, gathered on rank 0) for the training loop
and ``ssd eval`` (:mod:`ssd.commands.eval`); the metrics and detection files are :mod:`ssd.engine.evalset`'s.

Reading order: :func:`evaluate_model` (the one evaluation forward of the training loop and ``ssd eval``:
the same weights, precision, memory format and the checkpoint's preprocessing from :mod:`ssd.preprocess`)
runs :func:`predict_loader` and :func:`gather_predictions` (original-image continuous pixels, keyed by
image id) over a loader from :func:`build_eval_loader`; :class:`~ssd.engine.evalset.EvalSet` moves them into the frame
and ids of the annotation file and evaluates them; :func:`~ssd.engine.evalset.evaluate_predictions` is
the one entry point of the training loop and ``ssd eval``.

The annotation file's frame (the one detection files use) is described in :mod:`ssd.engine.evalset`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
from ssd.config import Config, ModelConfig, PreprocessConfig, TrainConfig
from ssd.data.dataset import DetectionDataset, build_dataset, collate
from ssd.data.loader import build_dataloader, default_num_workers
from ssd.device import resolve_device, use_channels_last
from ssd.engine.distributed import gather_objects, init_distributed
from ssd.engine.evalset import class_label_map, relabel_predictions
from ssd.model import SSD
from ssd.onnx_model import OnnxSSD, check_onnx_options, graph_preprocess, is_onnx
from ssd.postprocess import PostProcessor, build_postprocess
from ssd.preprocess import batch_input, collate_originals, eval_transform, resizes_in_loader
from ssd.weights import resolve_weights

log = logging.getLogger("ssd.eval")


# --- predictions ----------------------------------------------------------------------------------


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The run's autocast dtype on CUDA; None (fp32) on CPU, where bf16 autocast was far slower here.
    Training, its evaluations and ``ssd eval`` of its checkpoints all run at this precision."""
    if device.type != "cuda" or cfg.amp == "none":
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def build_eval_set(cfg: Config, model_cfg: ModelConfig, split: str = "val") -> DetectionDataset:
    """``data.<split>`` (``val`` or ``train``) prepared for ``model_cfg``'s input size and preprocessing
    (:func:`ssd.preprocess.eval_transform`): evaluation's images, never the training augmentation."""
    assert model_cfg.input_size is not None  # set by ModelConfig.__post_init__
    transform = eval_transform(cfg.data.augment, model_cfg.preprocess, model_cfg.input_size)
    dataset_cfg = getattr(cfg.data, split)
    return build_dataset(dataset_cfg, transform, train=False, on_error=cfg.data.on_error, key=f"data.{split}")


def build_eval_loader(
    dataset: DetectionDataset,
    model_cfg: ModelConfig,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    worker_nice: int = 0,
    distributed: bool | None = None,
    generator: torch.Generator | None = None,
):
    """Ordered batches of :func:`build_eval_set`'s dataset: uint8 ``[B, 3, S, S]`` resized in the workers
    (``bilinear``) or lists of original images (``normalize_then_bilinear``); this rank's shard under DDP."""
    collate_fn = collate if resizes_in_loader(model_cfg.preprocess) else collate_originals
    return build_dataloader(
        dataset,
        batch_size,
        train=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        distributed=distributed,
        worker_nice=worker_nice,
        collate_fn=collate_fn,
        generator=generator,
    )


def evaluate_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    loader,
    postprocessor: PostProcessor,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    warn_unreadable: bool = True,
) -> dict | None:
    """Predictions of ``model`` on every rank's shard of ``loader`` (from :func:`build_eval_loader`),
    gathered on rank 0 (None elsewhere): the evaluation forward shared by the training loop and ``ssd eval``.

    ``model`` is used as it is (its weights and BN statistics; eval mode meanwhile, its train/eval
    state restored), under ``amp_dtype`` autocast (:func:`amp_dtype`) and in ``channels_last`` when set.
    ``warn_unreadable``: see :func:`predict_loader`.
    """
    t0 = time.perf_counter()
    local = predict_loader(
        model, loader, postprocessor, model_cfg.preprocess, device, amp_dtype, channels_last, warn_unreadable
    )
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    log.info("rank %d: %d images in %.1f s", rank, len(local), time.perf_counter() - t0)
    return gather_predictions(local)


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader,
    postprocessor: PostProcessor,
    preprocess: PreprocessConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    warn_unreadable: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """``{image_id: {"boxes" [N, 4] xyxy original-image pixels, "scores", "labels"}}`` of this rank's shard.

    ``loader``: from :func:`build_eval_loader` (``preprocess`` decides the network input, see
    :func:`ssd.preprocess.batch_input`).
    Images the loader could not read (``data.on_error: skip``) get no entry and are counted in a
    warning (unless ``warn_unreadable`` is off: training images the loop already named): the evaluation
    treats them as images without detections.
    """
    modes = [(m, m.training) for m in model.modules()]  # frozen BN is a mixed state: restore every module's
    model.eval()
    net = cast(SSD, model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    priors, size = net.priors, int(net.input_size)
    results, unreadable = {}, []
    for batch in loader:
        unreadable += batch["errors"]
        if not batch["image_ids"]:
            continue
        images = batch_input(batch, preprocess, size, device)
        images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images)
        dets = postprocessor(out, priors, (images.shape[-2], images.shape[-1]), batch["orig_sizes"])
        for image_id, d in zip(batch["image_ids"], dets, strict=True):
            results[image_id] = {k: v.cpu().numpy() for k, v in d.items()}
    if unreadable and warn_unreadable:
        log.warning(
            "%d evaluation image(s) could not be read and count as images without detections, e.g. %s",
            len(unreadable),
            unreadable[0],
        )
    for m, training in modes:
        m.training = training
    return results


def gather_predictions(local: dict) -> dict | None:
    """Merge every rank's predictions on rank 0 (None on the other ranks). Keyed by image id, so an
    image seen by two ranks (a padding sampler) still counts once."""
    parts = gather_objects(local)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


# --- reports ----------------------------------------------------------------------------------------


# --- ssd eval ---------------------------------------------------------------------------------------


def predict_checkpoint(
    cfg,
    weights: str,
    device_name: str,
    batch_size: int,
    weights_kind: str | None = None,
    split: str = "val",
    threads: int | None = None,
) -> tuple[DetectionDataset, dict | None]:
    """Run the checkpoint (or exported ``.onnx``: :class:`ssd.onnx_model.OnnxSSD`, ``threads`` for ONNX
    Runtime) on ``data.<split>`` (each rank its shard under torchrun); predictions on rank 0, None elsewhere.
    ``weights_kind``: None for the checkpoint's default weights (the EMA ones of a run with ``train.ema``,
    those its logged mAP belongs to), ``"raw"`` or ``"ema"`` (:func:`ssd.checkpoint.checkpoint_weights`).

    The training loop's evaluation, reproduced: :func:`evaluate_model` with the checkpoint's preprocessing
    and the precision and memory format ``cfg.train`` gives on this device (autocast on CUDA, fp32 on the
    CPU; ``train.channels_last``), so ``ssd eval CONFIG --weights last.pt`` prints the run's last logged mAP.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_type = resolve_device(device_name, world_size=world).type  # checked before joining a process group
    ctx = init_distributed(device_type)
    weights = resolve_weights(weights)  # a name or URL: the cached file, fetched by each machine's first rank
    model: nn.Module
    if is_onnx(weights):
        check_onnx_options(weights, device_name, weights_kind)
        onnx_model = OnnxSSD(weights, threads)
        model, classes, device = onnx_model, onnx_model.classes, torch.device("cpu")
        preprocess = graph_preprocess(onnx_model.model_cfg.preprocess)  # the graph normalises itself
        model_cfg, channels_last, dtype = dataclasses.replace(onnx_model.model_cfg, preprocess=preprocess), False, None
    else:
        device = resolve_device(device_name, ctx.local_rank, world_size=ctx.world_size)
        ssd_model, ckpt = model_from_checkpoint(weights, weights_kind)
        if ckpt.get("eval_weights") == "ema" and ctx.is_main:
            default = " (its default; --weights-kind raw for the trained weights)" if weights_kind is None else ""
            log.info("%s: evaluating its %s weights%s", weights, "raw" if weights_kind == "raw" else "EMA", default)
        model, classes, model_cfg = ssd_model, ckpt["classes"], checkpoint_model_config(ckpt, weights)
        channels_last, dtype = use_channels_last(cfg.train.channels_last, device), amp_dtype(cfg.train, device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format  # as training's evaluation
        model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # stubs lack to(device, memory_format=)
    dataset = build_eval_set(cfg, model_cfg, split)
    label_map = class_label_map(classes, dataset.classes, weights)  # by position or by name: docs/evaluation.md
    num_workers = default_num_workers(cfg.data.num_workers)
    loader = build_eval_loader(dataset, model_cfg, batch_size, num_workers, pin_memory=device.type == "cuda")
    postprocessor = build_postprocess(cfg.postprocess, model_cfg)
    predictions = evaluate_model(model, model_cfg, loader, postprocessor, device, dtype, channels_last)
    return dataset, relabel_predictions(predictions, label_map)
