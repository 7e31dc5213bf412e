"""torchvision ``ssd300_vgg16`` state_dict -> our checkpoint (91 COCO-id classes, torchvision preprocessing)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ssd.checkpoint import make_checkpoint
from ssd.classes import coco_91_names
from ssd.config import ModelConfig, PreprocessConfig, PriorConfig
from ssd.convert.common import OUR_TRUNK, count_indexed, head_num_classes, prefix_map, rename

# torchvision SSDFeatureExtractorVGG: `features` = VGG features[:23]; `extra.0` = pool4, conv5_x, (pool5, fc6, fc7)
TV_TRUNK = [f"backbone.features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)] + [
    "backbone.extra.0.1",
    "backbone.extra.0.3",
    "backbone.extra.0.5",
    "backbone.extra.0.7.1",
    "backbone.extra.0.7.3",
]

# torchvision's transform: RGB in [0, 1], normalise with this mean and std 1/255, then bilinear resize
TV_PREPROCESS: dict[str, Any] = dict(
    channel_order="rgb",
    pixel_scale=1.0 / 255.0,
    mean=[0.48235, 0.45882, 0.40784],
    std=[1.0 / 255.0] * 3,
    resize="normalize_then_bilinear",
)
TV_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]  # 21 .. 315 px at 300


def torchvision_model_config(num_classes: int = 91) -> ModelConfig:
    return ModelConfig(
        arch="ssd300",
        num_classes=num_classes,
        dropout=0.0,  # torchvision's fc6/fc7 have no dropout
        priors=PriorConfig(scales=list(TV_SCALES), clip="wh"),
        preprocess=PreprocessConfig(**TV_PREPROCESS),
    )


def torchvision_key_map(num_levels: int) -> dict[str, str]:
    pairs = list(zip(TV_TRUNK, OUR_TRUNK, strict=True))
    for j in range(1, num_levels - 1):
        pairs += [
            (f"backbone.extra.{j}.0", f"extras.{j - 1}.0.conv"),
            (f"backbone.extra.{j}.2", f"extras.{j - 1}.1.conv"),
        ]
    for i in range(num_levels):
        pairs += [
            (f"head.regression_head.module_list.{i}", f"head.loc.{i}"),
            (f"head.classification_head.module_list.{i}", f"head.conf.{i}"),
        ]
    return {"backbone.scale_weight": "backbone.l2norm.weight", **prefix_map(pairs)}


def convert_torchvision(state: dict[str, Tensor], source: str = "torchvision state_dict") -> dict[str, Any]:
    """Convert a torchvision ``ssd300_vgg16`` state_dict (71 keys) to our checkpoint dict."""
    num_levels = count_indexed(state, "head.regression_head.module_list.")
    if num_levels != 6:
        raise ValueError(f"{source}: expected 6 head levels of ssd300_vgg16, found {num_levels}")
    num_classes = head_num_classes(
        state, "head.classification_head.module_list.0.weight", "head.regression_head.module_list.0.weight", source
    )
    ours = rename(state, torchvision_key_map(num_levels), source)
    names = coco_91_names() if num_classes == 91 else [f"class{i}" for i in range(1, num_classes)]
    return make_checkpoint(ours, torchvision_model_config(num_classes), names, "torchvision")
