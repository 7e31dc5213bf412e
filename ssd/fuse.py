"""Inference-time BatchNorm folding: ``conv -> BN`` becomes one conv with a bias.

In eval mode BatchNorm is the per-channel affine map ``y = (x - mean) / sqrt(var + eps) * gamma + beta``
with frozen statistics, so it folds into the convolution before it:
``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``
(``torch.nn.utils.fusion.fuse_conv_bn_weights``, evaluated here in float64 and cast back).
The folded network computes the same function with one layer and one pass over the
activations fewer per block.

Two ways a BN names its conv: it is the next child of the same parent (``ConvBlock``'s ``conv``/``bn``,
adjacent layers of an ``nn.Sequential``), or it is item ``i`` of a ``ModuleList`` called ``X_bn`` whose
sibling ``ModuleList`` ``X`` holds the conv at ``i`` (the prediction heads' ``loc_bn.i`` after ``loc.i``,
kept apart so the convs keep their checkpoint names).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def _check_foldable(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    if conv.out_channels != bn.num_features:
        raise ValueError(
            f"cannot fold a BatchNorm of {bn.num_features} channels into a conv with {conv.out_channels} outputs"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place (``conv`` gets a bias if it had none)."""
    _check_foldable(conv, bn)
    assert bn.running_mean is not None and bn.running_var is not None  # checked by _check_foldable
    f64: dict[str, Any] = dict(dtype=torch.float64)
    weight, bias = fuse_conv_bn_weights(
        conv.weight.detach().to(**f64),
        None if conv.bias is None else conv.bias.detach().to(**f64),
        bn.running_mean.to(**f64),
        bn.running_var.to(**f64),
        bn.eps,
        None if bn.weight is None else bn.weight.detach().to(**f64),
        None if bn.bias is None else bn.bias.detach().to(**f64),
    )
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d]]:
    """``(parent, BN attribute name, conv, bn)`` for every BN that follows a conv by one of the two rules above."""
    pairs: list[tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d]] = []
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, prev), (name, child) in itertools.pairwise(children):
            if isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d):
                pairs.append((parent, name, prev, child))
        siblings = dict(children)
        for name, bns in children:
            convs = siblings.get(name.removesuffix("_bn")) if name.endswith("_bn") else None
            if isinstance(bns, nn.ModuleList) and isinstance(convs, nn.ModuleList) and len(convs) == len(bns):
                pairs += [
                    (bns, str(i), conv, bn)
                    for i, (conv, bn) in enumerate(zip(convs, bns, strict=True))
                    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                ]
    return pairs


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every ``BatchNorm2d`` of an eval-mode ``model`` into its conv (see the module docstring), in place.

    Each folded BN is replaced by ``nn.Identity`` (so ``forward`` runs unchanged). Returns how many
    were folded. Raises ``ValueError`` for a model in training mode (its BNs use batch statistics)
    and for a BN without a conv to fold into; both are checked before any layer changes.
    """
    if model.training:
        raise ValueError(
            "fuse_batchnorm needs an eval-mode model (call model.eval() first): training BN uses batch statistics"
        )
    pairs = _conv_bn_pairs(model)
    paired = {id(bn) for *_, bn in pairs}
    left = [
        n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in paired
    ]
    if left:  # checked before touching anything: the model is never left half-folded
        raise ValueError(
            f"BatchNorm layers without a Conv2d to fold into (neither right after one nor X_bn.i of a sibling "
            f"X.i): {', '.join(left[:5])}"
        )
    if len({id(conv) for _, _, conv, _ in pairs}) < len(pairs):
        raise ValueError("a Conv2d is followed by more than one BatchNorm; fold by hand")
    for _, _, conv, bn in pairs:
        _check_foldable(conv, bn)
    for parent, name, conv, bn in pairs:
        fold_conv_bn(conv, bn)
        setattr(parent, name, nn.Identity())
    return len(pairs)
