"""BatchNorm modes for training (train / frozen / sync), precise BN, and the never-updated check."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_TYPES)]


def freeze_bn(model: nn.Module) -> int:
    """``frozen`` mode: BN uses its running statistics and its affine parameters stop training.
    Call after every ``model.train()`` (see :func:`set_train_mode`). Returns the layer count."""
    layers = bn_layers(model)
    for _, m in layers:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return len(layers)


def set_train_mode(model: nn.Module, bn_mode: str) -> None:
    model.train()
    if bn_mode == "frozen":
        freeze_bn(model)


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object], num_batches: int) -> int:
    """Recompute every BN layer's running statistics as population statistics over ``num_batches``.

    With ``momentum=None`` PyTorch keeps the cumulative average of the batch means and of the
    *unbiased* batch variances: exactly the BN paper's inference statistics (Alg. 2,
    ``Var[x] = m/(m-1) E_B[sigma_B^2]``). Dropout is off meanwhile, so BN sees inference-time
    inputs. Under DDP the per-rank statistics are averaged. Returns the number of batches used.
    """
    layers = [m for _, m in bn_layers(model)]
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    for batch in batches:
        if used >= num_batches:
            break
        forward(model, batch)
        used += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(world)
    model.train(was_training)
    return used


def stale_bn_layers(model: nn.Module) -> list[str]:
    """BN layers whose running statistics were never updated (still mean 0, var 1): in eval mode they
    normalise with the wrong statistics, the classic "good in training, bad at test" failure.
    ``num_batches_tracked`` is not consulted: converted or loaded weights carry real statistics
    with a counter of 0."""
    stale = []
    for name, m in bn_layers(model):
        if m.running_mean is None:
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
            where, len(stale), stale[0],
        )  # fmt: skip
    return stale
