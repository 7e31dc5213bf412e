"""Multibox heads (paper Sec. 2.1): one 3x3 conv for box offsets and one for class scores per source."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _flatten(x: Tensor, k: int) -> Tensor:
    """[B, A*K, H, W] -> [B, H*W*A, K]: location-major, then anchor, like the priors."""
    b = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(b, -1, k)


class MultiBoxHead(nn.Module):
    """``loc.i`` predicts 4 offsets and ``conf.i`` ``num_classes`` logits per prior of source i."""

    def __init__(self, in_channels: list[int], num_anchors: list[int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loc = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(in_channels, num_anchors))
        self.conf = nn.ModuleList(nn.Conv2d(c, a * num_classes, 3, padding=1) for c, a in zip(in_channels, num_anchors))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        loc = torch.cat([_flatten(m(f), 4) for m, f in zip(self.loc, features)], dim=1)  # [B, P, 4]
        conf = torch.cat([_flatten(m(f), self.num_classes) for m, f in zip(self.conf, features)], dim=1)  # [B, P, C]
        return {"loc": loc, "conf": conf}
