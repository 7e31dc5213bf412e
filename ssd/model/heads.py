"""Multibox heads (paper Sec. 2.1): one 3x3 conv for box offsets and one for class scores per source.

With ``batch_norm`` a BatchNorm sits directly on the output of every prediction conv, with no ReLU
after it, and the conv loses its bias (BN's beta replaces it): Caffe SSD's ``CreateMultiBoxHead``
with ``use_batchnorm`` and ScratchDet (Zhu et al., CVPR 2019) place it there. The BN layers are
siblings of the convs (``loc_bn.i`` next to ``loc.i``), so the convs keep their parameter names and
checkpoints without head BN still load into them; :func:`ssd.fuse.fuse_batchnorm` pairs a ``ModuleList``
``X_bn`` with its sibling ``X`` by this naming (docs/batchnorm.md, "Where every BN layer sits").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _flatten(x: Tensor, k: int) -> Tensor:
    """[B, A*K, H, W] -> [B, H*W*A, K]: location-major, then anchor, like the priors."""
    b = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(b, -1, k)


class MultiBoxHead(nn.Module):
    """``loc.i`` predicts 4 offsets and ``conf.i`` ``num_classes`` logits per prior of source i;
    with ``batch_norm``, ``loc_bn.i`` / ``conf_bn.i`` normalise those outputs."""

    # set with setattr in __init__ (the ``*_bn`` lists only with ``batch_norm``)
    loc: nn.ModuleList
    conf: nn.ModuleList
    loc_bn: nn.ModuleList
    conf_bn: nn.ModuleList

    def __init__(
        self,
        in_channels: list[int],
        num_anchors: list[int],
        num_classes: int,
        batch_norm: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.batch_norm = batch_norm
        outs = {"loc": [a * 4 for a in num_anchors], "conf": [a * num_classes for a in num_anchors]}
        for kind, channels in outs.items():
            convs = nn.ModuleList(
                nn.Conv2d(c, o, 3, padding=1, bias=not batch_norm) for c, o in zip(in_channels, channels, strict=True)
            )
            setattr(self, kind, convs)
            if batch_norm:
                setattr(
                    self,
                    f"{kind}_bn",
                    nn.ModuleList(nn.BatchNorm2d(o, eps=bn_eps, momentum=bn_momentum) for o in channels),
                )

    def _predict(self, kind: str, features: list[Tensor], k: int) -> Tensor:
        convs = getattr(self, kind)
        outs = [conv(f) for conv, f in zip(convs, features, strict=True)]
        if self.batch_norm:
            outs = [bn(x) for bn, x in zip(getattr(self, f"{kind}_bn"), outs, strict=True)]
        return torch.cat([_flatten(x, k) for x in outs], dim=1)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        loc = self._predict("loc", features, 4)  # [B, P, 4]
        conf = self._predict("conf", features, self.num_classes)  # [B, P, C]
        return {"loc": loc, "conf": conf}
