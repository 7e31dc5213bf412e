"""The VGG16 trunk of SSD with optional BatchNorm per block, L2Norm on conv4_3 and fc6/fc7.

Module names are stable whatever BatchNorm is enabled (``conv4.2.conv``, ``conv4.2.bn``),
so converters and fine-tuning never depend on layer indices (ssd.pytorch's ``batch_norm``
flag broke exactly there).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ssd.config import ExtraLayer
from ssd.device import STEM_CHUNK_BYTES

# VGG16 "D" (Simonyan & Zisserman, Table 1): output channels of each conv, per block
VGG16_BLOCKS = {
    "conv1": [64, 64],
    "conv2": [128, 128],
    "conv3": [256, 256, 256],
    "conv4": [512, 512, 512],
    "conv5": [512, 512, 512],
}
FC_CHANNELS = 1024  # paper: fc6/fc7 reduced from 4096 to 1024 by sub-sampling
# Canonical order of the 15 trunk convolutions; converters map foreign layouts onto it.
TRUNK_LAYERS = [f"{b}.{i}" for b, chans in VGG16_BLOCKS.items() for i in range(len(chans))] + ["fc6", "fc7"]


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 4 so every layer stays meaningful)."""
    return max(4, int(round(channels * width)))


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet; SSD on conv4_3).

    ``y = scale * x / sqrt(sum_c x^2 + eps)``. The eps sits inside the square root, so an
    all-zero input gives 0 (not NaN) with a finite gradient; the norm is computed in float32
    so fp16 autocast cannot overflow the sum of squares.
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.init_scale = scale
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        inv_norm = torch.rsqrt(xf.pow(2).sum(dim=1, keepdim=True) + self.eps)
        return (self.weight.view(1, -1, 1, 1) * xf * inv_norm).to(x.dtype)


class ConvBlock(nn.Module):
    """conv -> [BN] -> ReLU. The conv has no bias when BN follows it (BN's beta replaces it)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        batch_norm: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _stage(in_ch: int, channels: list[int], **kw: Any) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for out_ch in channels:
        layers.append(ConvBlock(in_ch, out_ch, **kw))
        in_ch = out_ch
    return nn.Sequential(*layers), in_ch


class VGG16Trunk(nn.Module):
    """VGG16 conv1_1..conv5_3 + atrous fc6 + fc7 (paper Sec. 3, "Base network").

    Returns the two trunk sources: L2-normalised conv4_3 (after its ReLU) and fc7.
    pool3 uses ``ceil_mode`` (38x38 conv4_3 at 300 px); pool5 is 3x3 stride 1 so fc6
    (3x3, dilation 6) keeps the 19x19 resolution. On a small input the pool5 map shrinks with it
    (8x8 at 128 px) and most of a dilation-6 kernel reads padding: ``fc6_dilation`` sets it.
    """

    # set with setattr from VGG16_BLOCKS in __init__
    conv1: nn.Sequential
    conv2: nn.Sequential
    conv3: nn.Sequential
    conv4: nn.Sequential
    conv5: nn.Sequential

    def __init__(
        self,
        width: float = 1.0,
        bn_blocks: Sequence[str] = (),
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        dropout: float = 0.5,
        l2norm_scale: float = 20.0,
        fc6_dilation: int = 6,
    ) -> None:
        super().__init__()
        in_ch = 3
        for name, chans in VGG16_BLOCKS.items():
            bn: dict[str, Any] = dict(batch_norm=name in bn_blocks, bn_eps=bn_eps, bn_momentum=bn_momentum)
            stage, in_ch = _stage(in_ch, [scaled(c, width) for c in chans], **bn)
            setattr(self, name, stage)
        self.l2norm = L2Norm(scaled(512, width), l2norm_scale)
        self.pool = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.pool5 = nn.MaxPool2d(3, 1, 1)
        fc: dict[str, Any] = dict(batch_norm="fc" in bn_blocks, bn_eps=bn_eps, bn_momentum=bn_momentum)
        fc_ch = scaled(FC_CHANNELS, width)
        self.fc6 = ConvBlock(in_ch, fc_ch, 3, padding=fc6_dilation, dilation=fc6_dilation, **fc)
        self.fc7 = ConvBlock(fc_ch, fc_ch, 1, padding=0, **fc)
        # paper-reproduction configs use p=0; Identity keeps the module tree free of no-op dropout
        self.drop6 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop7 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_channels = [scaled(512, width), fc_ch]
        self.stem_chunk_bytes = STEM_CHUNK_BYTES  # 0: never in chunks

    def stem(self, x: Tensor) -> Tensor:
        """conv1 and conv2 with their pools: the full- and half-resolution maps, a quarter of the forward's
        compute on SSD300 and the blocks the paper's fine-tuning freezes (``train.freeze``)."""
        return self.pool(self.conv2(self.pool(self.conv1(x))))

    def stem_chunk(self, x: Tensor) -> int:
        """Images per chunk in which :meth:`stem` runs ``x``, or 0 for the batch at once.

        Chunks only on the CPU, where a batch's full-resolution maps overflow the cache (the conv output
        is written to memory and read back), and only when nothing in the stem needs a gradient
        (inference, or conv1-2 frozen) and no BatchNorm in it is in training mode: then each image's
        result does not depend on the others, so the outputs are the same. Never while tracing or
        compiling, whose graph must not depend on the example's batch size."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return 0
        batch = x.shape[0]
        if self.stem_chunk_bytes <= 0 or x.device.type != "cpu" or batch < 2:
            return 0
        params = itertools.chain(self.conv1.parameters(), self.conv2.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return 0
        modules = itertools.chain(self.conv1.modules(), self.conv2.modules())
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in modules):
            return 0
        per_image = cast(ConvBlock, self.conv1[0]).conv.out_channels * x.shape[-2] * x.shape[-1] * 4
        chunk = max(1, self.stem_chunk_bytes // per_image)
        return chunk if chunk < batch else 0

    def forward(self, x: Tensor) -> list[Tensor]:
        chunk = self.stem_chunk(x)
        x = torch.cat([self.stem(part) for part in x.split(chunk)]) if chunk else self.stem(x)
        x = self.pool3(self.conv3(x))
        x = self.conv4(x)
        conv4_3 = self.l2norm(x)
        x = self.pool5(self.conv5(self.pool(x)))
        x = self.drop6(self.fc6(x))
        x = self.drop7(self.fc7(x))
        return [conv4_3, x]


class Extras(nn.ModuleList):
    """Extra feature blocks after fc7 (paper Fig. 2): each is 1x1 -> kxk conv, each output a source."""

    def __init__(
        self,
        in_channels: int,
        layers: list[ExtraLayer],
        width: float = 1.0,
        batch_norm: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        bn: dict[str, Any] = dict(batch_norm=batch_norm, bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.out_channels: list[int] = []
        for spec in layers:
            mid, out = scaled(spec.mid, width), scaled(spec.out, width)
            self.append(
                nn.Sequential(
                    ConvBlock(in_channels, mid, 1, padding=0, **bn),
                    ConvBlock(mid, out, spec.kernel, spec.stride, spec.padding, **bn),
                )
            )
            self.out_channels.append(out)
            in_channels = out

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for block in self:
            x = block(x)
            outs.append(x)
        return outs
