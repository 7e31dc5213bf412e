"""The optimizer and the learning-rate schedule of a training run (``train.*``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from ssd.config import TrainConfig
from ssd.engine.step import fused_optimizer_ok, prime_momentum

log = logging.getLogger("ssd.train")


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (paper) or AdamW; optionally no weight decay on BN and bias parameters. Fused kernels where
    torch has them (CPU, CUDA): one kernel per step, and the on-device skip of :mod:`ssd.engine.step`."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm_or_bias = p.ndim <= 1 and "l2norm" not in name  # BN weight/bias, conv biases
        (no_decay if cfg.no_decay_bn_bias and is_norm_or_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})

    def make(fused: bool | None) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)

    optimizer = None
    if fused_optimizer_ok(decay + no_decay):
        try:
            optimizer = make(True)
        except RuntimeError as e:  # a torch without this device's fused kernel: the step then decides skips on the host
            log.debug("fused %s unavailable (%s); using the default implementation", cfg.optimizer, e)
    optimizer = optimizer or make(None)
    prime_momentum(optimizer)
    return optimizer


def lr_factor(it: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Multiplier of ``train.lr`` at iteration ``it``: linear warmup from ``warmup_factor``, then
    step decay by ``gamma`` at each of ``steps`` or a cosine to 0 at ``max_iter``. With
    ``schedule_by_time`` the schedule runs at the larger of ``it`` and ``time_fraction`` (of
    ``time_limit``) times ``max_iter``, so a slow machine still anneals before the time limit."""
    at = max(it, time_fraction * cfg.max_iter) if cfg.schedule_by_time else it
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(at >= s for s in cfg.steps)
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * min(at, cfg.max_iter) / cfg.max_iter))
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, elapsed: Callable[[], float]
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` per step; ``elapsed()`` is the run's training time (``train.schedule_by_time``)."""
    time_limit = cfg.time_limit  # never None with schedule_by_time (TrainConfig.__post_init__)
    by_time = cfg.schedule_by_time and time_limit is not None

    def factor(it: int) -> float:
        return lr_factor(it, cfg, elapsed() / time_limit if by_time and time_limit else 0.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
