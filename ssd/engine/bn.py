"""BatchNorm modes for training (train / frozen / sync), precise BN and the never-updated check.
The ``ssd bn-report`` diagnostics (running vs batch statistics, train/eval gap) are in
:mod:`ssd.engine.bn_report`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_TYPES)]


def freeze_bn(model: nn.Module, names: Collection[str] | None = None) -> int:
    """``frozen`` mode: BN uses its running statistics and its affine parameters stop training.
    ``names``: the layers to freeze (default: every BN layer). Call after every ``model.train()``
    (see :func:`set_train_mode`). Returns the number of layers frozen."""
    layers = [m for name, m in bn_layers(model) if names is None or name in names]
    for m in layers:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return len(layers)


def set_train_mode(model: nn.Module, bn_mode: str, frozen: Collection[str] | None = None) -> None:
    """``model.train()``, then freeze the BN layers named in ``frozen`` (with ``bn_mode == "frozen"``,
    default: all; the training loop passes :func:`frozen_bn_layers` and those of ``train.freeze`` blocks)."""
    model.train()
    if bn_mode == "frozen" or frozen:
        freeze_bn(model, frozen)


def trained_bn_layers(model: nn.Module, loaded_keys: Iterable[str]) -> list[str]:
    """BN layers (forward order) that came with trained statistics: both their ``running_mean`` and
    ``running_var`` are among ``loaded_keys`` (the ``"loaded"`` lists of
    :func:`ssd.engine.finetune.init_weights_from`)."""
    loaded = set(loaded_keys)
    return [name for name, _ in bn_layers(model) if {f"{name}.running_mean", f"{name}.running_var"} <= loaded]


def frozen_bn_layers(model: nn.Module, bn_mode: str, loaded_keys: Iterable[str]) -> list[str]:
    """The BN layers ``train.bn`` freezes: with ``frozen``, those whose statistics were loaded by
    ``model.init`` / ``model.init_backbone`` (:func:`trained_bn_layers`); layers that never saw
    training data (new extras, a model without init) train, since freezing them would fix their
    initial mean 0 / var 1 forever. With ``train`` and ``sync``: none. Logs the split (and warns
    when ``frozen`` finds nothing to freeze). A function of the init files alone, so a resumed run
    (which loads them again before its checkpoint) freezes the same layers."""
    if bn_mode != "frozen":
        return []
    names = [name for name, _ in bn_layers(model)]
    frozen = trained_bn_layers(model, loaded_keys)
    training = [name for name in names if name not in frozen]
    if names and not frozen:
        log.warning(
            "train.bn=frozen: no BatchNorm layer has trained statistics (nothing loaded them from model.init or "
            "model.init_backbone), so all %d train as with train.bn=train",
            len(names),
        )
    elif training:
        log.info(
            "train.bn=frozen: %d BatchNorm layer(s) frozen with their loaded statistics (%s); %d without trained "
            "statistics train (%s)",
            len(frozen),
            _names(frozen),
            len(training),
            _names(training),
        )
    elif frozen:
        log.info("train.bn=frozen: all %d BatchNorm layers frozen with their loaded statistics", len(frozen))
    return frozen


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# Per-process batches below this make BN's batch statistics noisy enough to cost accuracy (Wu & He 2018,
# Group Normalization, Table 2: ResNet-50 with BN, ImageNet error 23.6 / 24.8 / 27.3 / 34.7% at
# 32 / 8 / 4 / 2 images per GPU).
MIN_BN_BATCH = 8


def small_batch_warning(bn_mode: str, world_size: int, per_process_batch: int) -> str | None:
    """The warning for BN in ``train`` mode under DDP with fewer than :data:`MIN_BN_BATCH` images per
    process (each process normalises with its own small batch's statistics), else None."""
    if bn_mode != "train" or world_size < 2 or per_process_batch >= MIN_BN_BATCH:
        return None
    return (
        f"train.bn=train with {per_process_batch} image(s) per process ({world_size} processes): each BatchNorm layer "
        f"normalises with the statistics of {per_process_batch} images. Use train.bn=sync (statistics over the global "
        f"batch of {per_process_batch * world_size}, CUDA) or train.bn=frozen (fine-tuning from trained statistics), "
        f"or {MIN_BN_BATCH}+ images per process; see docs/batchnorm.md"
    )


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, Any], object],
    num_batches: int,
    frozen: Collection[str] = (),
) -> int:
    """Recompute the BN layers' running statistics as population statistics over ``num_batches``.

    With ``momentum=None`` PyTorch keeps the cumulative average of the batch means and of the
    *unbiased* batch variances: exactly the BN paper's inference statistics (Alg. 2,
    ``Var[x] = m/(m-1) E_B[sigma_B^2]``). Dropout is off meanwhile, so BN sees inference-time
    inputs. Layers named in ``frozen`` keep their statistics and normalise with them, as in
    training. Under DDP the per-rank statistics are averaged. Every module's train/eval state is
    restored. Returns the number of batches used.

    ``batches`` must not be the training loop's persistent loader (see
    :func:`ssd.data.loader.build_dataloader`): the training engine gives precise BN a loader of its own.
    """
    layers = [m for name, m in bn_layers(model) if name not in frozen]
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    for batch in islice(batches, num_batches):  # no batch read beyond the last one used
        forward(model, batch)
        used += 1
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                assert buf is not None  # reset_running_stats above: the layers track statistics
                dist.all_reduce(buf)
                buf.div_(world)
    for module, training in modes:
        module.training = training
    return used


@torch.no_grad()
def broadcast_bn_statistics(model: nn.Module, src: int = 0) -> None:
    """Under DDP give every rank rank ``src``'s BN running statistics (a no-op in a single process).

    DDP broadcasts rank 0's buffers at the start of each forward, so after the last step before an
    evaluation or a save each rank holds statistics moved by its own last batch. Rank 0's are the ones
    DDP trains with and the ones a checkpoint saves: every rank evaluates with those (not an average,
    which no rank trained with)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, m in bn_layers(model):
        for buffer in m.buffers():
            dist.broadcast(buffer, src)


def non_finite_bn_layers(model: nn.Module) -> list[str]:
    """BN layers whose running mean or variance holds a NaN or an infinity (one host read per layer)."""
    return [
        name
        for name, m in bn_layers(model)
        if m.running_mean is not None
        and m.running_var is not None
        and not bool(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())
    ]


def stale_bn_layers(model: nn.Module) -> list[str]:
    """BN layers whose running statistics were never updated (still mean 0, var 1): in eval mode they
    normalise with the wrong statistics, the classic "good in training, bad at test" failure.
    ``num_batches_tracked`` is not consulted: converted or loaded weights carry real statistics
    with a counter of 0."""
    stale = []
    for name, m in bn_layers(model):
        if m.running_mean is None or m.running_var is None:  # both or neither
            continue
        if bool((m.running_mean == 0).all() and (m.running_var == 1).all()):
            stale.append(name)
    return stale


def warn_stale_bn(model: nn.Module, where: str) -> list[str]:
    stale = stale_bn_layers(model)
    if stale:
        log.warning(
            "%s: %d BatchNorm layer(s) still have their initial running statistics (e.g. %s); eval-mode outputs will "
            "be wrong. Train with train.bn=train or recompute them with train.precise_bn_batches > 0.",
            where,
            len(stale),
            stale[0],
        )
    return stale
