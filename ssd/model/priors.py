"""Default boxes ("priors", paper Sec. 2.2) for the feature maps the network really produces.

Priors are ``cxcywh`` normalised to [0, 1] of the input. Order (the same as ssd.pytorch,
lufficc and torchvision, so their heads line up): level-major; within a level rows outer,
columns inner; per location ``[s_k, sqrt(s_k * s_k+1)]`` squares, then for each aspect ratio
``r`` a wide box ``(s_k sqrt r, s_k / sqrt r)`` followed by a tall one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ssd.config import ARCH_PRIOR_SIZES, ARCH_STEPS, ConfigError, ModelConfig


def caffe_prior_scales(num_levels: int, min_ratio: int = 20, max_ratio: int = 90) -> list[float]:
    """Scales of the original Caffe ``ssd_pascal.py`` for ``num_levels`` sources, plus one.

    Level 0 gets 0.1 (and 0.2 as its "max"); levels 1.. are spaced linearly from ``min_ratio``%
    with an integer step ``floor((max - min) / (L - 2))`` (paper eq. 4). For 6 levels at 300 px
    this gives min sizes 30, 60, 111, 162, 213, 264 and max sizes 60, 111, ..., 315.
    """
    if num_levels < 2:
        return [0.1, 0.2]
    step = (max_ratio - min_ratio) // max(1, num_levels - 2)
    ratios = [min_ratio + step * k for k in range(num_levels)]  # percent; last one is the final max
    return [0.1] + [r / 100.0 for r in ratios]


def default_aspect_ratios(num_levels: int) -> list[list[float]]:
    """Paper layout: [2] on the first and the last two levels, [2, 3] elsewhere."""
    if num_levels <= 3:
        return [[2.0]] * num_levels
    return [[2.0]] + [[2.0, 3.0]] * (num_levels - 3) + [[2.0], [2.0]]


def make_priors(
    feature_sizes: list[tuple[int, int]],
    image_size: tuple[int, int],
    min_scales: list[float],
    max_scales: list[float],
    aspect_ratios: list[list[float]],
    steps: list[float] | None = None,
    clip: str = "corners",
) -> Tensor:
    """Priors ``Tensor[P, 4]`` (cxcywh, normalised) for feature maps ``[(h, w), ...]``.

    ``min_scales``/``max_scales`` are fractions of the input side per level; ``steps`` are the
    pixel strides of each level's cell centres (None: image size / feature size).
    Computed in float64 and returned as float32.
    """
    if not len(feature_sizes) == len(min_scales) == len(max_scales) == len(aspect_ratios):
        raise ValueError(
            f"priors: {len(feature_sizes)} feature maps but {len(min_scales)} min sizes, "
            f"{len(max_scales)} max sizes, {len(aspect_ratios)} aspect-ratio lists"
        )
    img_h, img_w = image_size
    levels = []
    for k, (fh, fw) in enumerate(feature_sizes):
        s_k, s_next = min_scales[k], max_scales[k]
        wh = [(s_k, s_k), (math.sqrt(s_k * s_next),) * 2]
        for r in aspect_ratios[k]:
            sq = math.sqrt(r)
            wh += [(s_k * sq, s_k / sq), (s_k / sq, s_k * sq)]
        wh_t = torch.tensor(wh, dtype=torch.float64)  # [A, 2]
        step_y, step_x = (img_h / fh, img_w / fw) if steps is None else (steps[k], steps[k])
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step_y / img_h
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step_x / img_w
        cyy, cxx = torch.meshgrid(cy, cx, indexing="ij")  # rows outer, columns inner
        centres = torch.stack((cxx, cyy), dim=-1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
        if clip == "wh":  # torchvision: clamp only the sizes
            wh_t = wh_t.clamp(0.0, 1.0)
        boxes = torch.cat((centres, wh_t.expand(fh * fw, -1, -1)), dim=-1)
        levels.append(boxes.reshape(-1, 4))
    priors = torch.cat(levels)
    if clip == "corners":  # ssd.pytorch / lufficc: clamp all four cxcywh values
        priors = priors.clamp(0.0, 1.0)
    return priors.to(torch.float32)


def num_priors_per_location(aspect_ratios: list[list[float]]) -> list[int]:
    return [2 + 2 * len(r) for r in aspect_ratios]


def resolve_prior_layout(cfg: ModelConfig, num_levels: int) -> dict:
    """Config -> plain arguments of :func:`make_priors` (except feature sizes) for ``num_levels``."""
    p, size = cfg.priors, cfg.input_size
    assert size is not None  # set by ModelConfig.__post_init__
    if p.scales is not None:
        scales = p.scales
        if len(scales) != num_levels + 1:
            raise ConfigError(
                f"model.priors.scales needs {num_levels + 1} values for {num_levels} levels, got {len(scales)}"
            )
        min_s, max_s = scales[:-1], scales[1:]
    elif p.min_sizes is not None:
        assert p.max_sizes is not None  # PriorConfig.__post_init__: given together
        min_s, max_s = [m / size for m in p.min_sizes], [m / size for m in p.max_sizes]
    elif cfg.native_size and len(ARCH_PRIOR_SIZES[cfg.arch][0]) == num_levels:
        mins, maxs = ARCH_PRIOR_SIZES[cfg.arch]
        min_s, max_s = [m / size for m in mins], [m / size for m in maxs]
    else:
        scales = caffe_prior_scales(num_levels)
        min_s, max_s = scales[:-1], scales[1:]
    for name, vals in (("min sizes", min_s), ("max sizes", max_s)):
        if len(vals) != num_levels:
            raise ConfigError(f"model.priors: {len(vals)} {name} for {num_levels} feature levels")
    ratios = p.aspect_ratios if p.aspect_ratios is not None else default_aspect_ratios(num_levels)
    if len(ratios) != num_levels:
        raise ConfigError(f"model.priors.aspect_ratios: {len(ratios)} lists for {num_levels} feature levels")
    steps = p.steps
    if steps is None and cfg.native_size and len(ARCH_STEPS[cfg.arch]) == num_levels:
        steps = ARCH_STEPS[cfg.arch]
    if steps is not None and len(steps) != num_levels:
        raise ConfigError(f"model.priors.steps: {len(steps)} values for {num_levels} feature levels")
    return dict(min_scales=min_s, max_scales=max_s, aspect_ratios=ratios, steps=steps, clip=p.clip)
