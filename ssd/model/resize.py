"""The network at another input size: what follows from ``model.input_size`` and what it costs.

A larger input makes every feature map larger. So that the pyramid still ends where it did (the
demo's 1x1 map at 128 px), :func:`config_at_input_size` adds extra blocks; fc6's dilation grows with
the pool5 map so its kernel keeps covering the same fraction of the image. Feature sizes always
come from running the layers (:func:`ssd.model.ssd.feature_sizes`), never from a formula.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ssd.config import ModelConfig
from ssd.model.ssd import SSD, _meta_call, feature_sizes
from ssd.model.vgg import Extras, VGG16Trunk

MAX_ADDED_EXTRAS = 8


def model_feature_sizes(cfg: ModelConfig, input_size: int | None = None) -> list[tuple[int, int]]:
    """Feature map sizes ``[(h, w), ...]`` of the network ``cfg`` describes at ``input_size`` (default its own)."""
    assert cfg.input_size is not None and cfg.extras is not None  # set by ModelConfig.__post_init__
    backbone = VGG16Trunk(cfg.width, [], dropout=0.0, fc6_dilation=cfg.fc6_dilation)  # BN and dropout keep the sizes
    extras = Extras(backbone.out_channels[-1], cfg.extras, cfg.width)
    return feature_sizes(backbone, extras, input_size or cfg.input_size)


def config_at_input_size(cfg: ModelConfig, input_size: int) -> ModelConfig:
    """``cfg`` at ``input_size`` (not smaller than today's), with what follows from it:

    - extras: while the last feature map is larger than it is at ``cfg.input_size``, a copy of the
      last stride-2 extra block is inserted after it (one more level), or appended at the end when
      the blocks after it no longer fit; never so that the last map ends up smaller;
    - ``fc6_dilation``: scaled with the pool5 (= fc7) map and rounded down, at least 1 (paper: 6 on
      SSD300's 19x19; the demo's 1 on 8x8 stays 1 up to 15x15);
    - ``priors``: unchanged; explicit ``priors.steps`` (pixels of the old input) are dropped, so the
      strides follow the new feature maps. The caller sets prior sizes for the new level count.
    """
    assert cfg.input_size is not None and cfg.extras is not None  # set by ModelConfig.__post_init__
    if input_size < cfg.input_size:
        raise ValueError(f"config_at_input_size: {input_size} px is smaller than model.input_size {cfg.input_size}")
    old_sizes = model_feature_sizes(cfg)
    new = dataclasses.replace(cfg, input_size=input_size, extras=[dataclasses.replace(e) for e in cfg.extras])
    sizes = model_feature_sizes(new)
    for _ in range(MAX_ADDED_EXTRAS):
        assert new.extras is not None  # a copy of cfg.extras, or the trial's list
        stride2 = [i for i, e in enumerate(new.extras) if e.stride == 2]
        if sizes[-1][0] <= old_sizes[-1][0] or not stride2:
            break
        block = new.extras[stride2[-1]]
        for at in (stride2[-1] + 1, len(new.extras)):  # after the last stride-2 block, else at the end
            trial = dataclasses.replace(new, extras=new.extras[:at] + [dataclasses.replace(block)] + new.extras[at:])
            try:
                trial_sizes = model_feature_sizes(trial)
            except ValueError:  # a later kernel (SSD300's 3x3 without padding) no longer fits the smaller map
                continue
            if trial_sizes[-1][0] >= old_sizes[-1][0]:
                break
        else:
            break
        new, sizes = trial, trial_sizes
    dilation = max(1, math.floor(cfg.fc6_dilation * sizes[1][0] / old_sizes[1][0]))
    priors = dataclasses.replace(cfg.priors, steps=None) if input_size != cfg.input_size else cfg.priors
    return dataclasses.replace(new, fc6_dilation=dilation, priors=priors)


def conv_macs_per_image(model: SSD) -> int:
    """Multiply-accumulates of every ``Conv2d`` for one image, counted on meta tensors (no compute)."""
    total = 0

    def hook(module: torch.nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw  # output[0]: one image

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            _meta_call(model, torch.empty(2, 3, model.input_size, model.input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total
