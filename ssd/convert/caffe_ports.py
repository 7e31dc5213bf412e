"""ssd.pytorch (amdegroot) and lufficc/SSD state_dicts -> our checkpoint.

Both ports keep the Caffe layer indices (``vgg.N``) and the same shapes; they differ in key
prefixes and input: ssd.pytorch was trained on BGR 0..255 minus (104, 117, 123), lufficc on
RGB 0..255 minus (123, 117, 104); both resize with OpenCV bilinear and clamp all four prior values.
The class count (21 VOC or 81 COCO) picks the prior sizes and class names.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ssd.checkpoint import make_checkpoint
from ssd.classes import COCO_CLASSES, VOC_CLASSES
from ssd.config import ModelConfig, PreprocessConfig, PriorConfig
from ssd.convert.common import CAFFE_VGG_INDICES, OUR_TRUNK, count_indexed, head_num_classes, prefix_map, rename

# lufficc configs for COCO (the VOC sizes are the ssd300/ssd512 presets)
COCO_PRIOR_SIZES: dict[int, tuple[list[float], list[float]]] = {
    300: ([21, 45, 99, 153, 207, 261], [45, 99, 153, 207, 261, 315]),
    512: ([20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8], [51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72]),
}
LAYOUTS: dict[str, dict[str, Any]] = {
    "amdegroot": dict(
        vgg="vgg.",
        extras="extras.",
        l2norm="L2Norm.weight",
        loc="loc.",
        conf="conf.",
        channel_order="bgr",
        mean=[104.0, 117.0, 123.0],
    ),
    "lufficc": dict(
        vgg="backbone.vgg.",
        extras="backbone.extras.",
        l2norm="backbone.l2_norm.weight",
        loc="box_head.predictor.reg_headers.",
        conf="box_head.predictor.cls_headers.",
        channel_order="rgb",
        mean=[123.0, 117.0, 104.0],
    ),
}


def caffe_port_key_map(layout: dict[str, str], num_levels: int) -> dict[str, str]:
    pairs = [(f"{layout['vgg']}{i}", ours) for i, ours in zip(CAFFE_VGG_INDICES, OUR_TRUNK, strict=True)]
    for j in range(num_levels - 2):
        pairs += [
            (f"{layout['extras']}{2 * j}", f"extras.{j}.0.conv"),
            (f"{layout['extras']}{2 * j + 1}", f"extras.{j}.1.conv"),
        ]
    for i in range(num_levels):
        pairs += [(f"{layout['loc']}{i}", f"head.loc.{i}"), (f"{layout['conf']}{i}", f"head.conf.{i}")]
    return {layout["l2norm"]: "backbone.l2norm.weight", **prefix_map(pairs)}


def convert_caffe_port(state: dict[str, Tensor], port: str, source: str = "state_dict") -> dict[str, Any]:
    """Convert an ssd.pytorch (``port="amdegroot"``) or lufficc/SSD (``"lufficc"``) state_dict."""
    layout = LAYOUTS[port]
    num_levels = count_indexed(state, layout["loc"])
    if num_levels not in (6, 7):
        raise ValueError(f"{source}: found {num_levels} {layout['loc']}N heads; SSD300 has 6, SSD512 has 7")
    arch, size = ("ssd300", 300) if num_levels == 6 else ("ssd512", 512)
    num_classes = head_num_classes(state, f"{layout['conf']}0.weight", f"{layout['loc']}0.weight", source)
    ours = rename(state, caffe_port_key_map(layout, num_levels), source)
    if num_classes == 81:
        names = COCO_CLASSES
        priors = PriorConfig(min_sizes=list(COCO_PRIOR_SIZES[size][0]), max_sizes=list(COCO_PRIOR_SIZES[size][1]))
    else:
        names = VOC_CLASSES if num_classes == 21 else [f"class{i}" for i in range(1, num_classes)]
        priors = PriorConfig()  # the arch's VOC preset
    cfg = ModelConfig(
        arch=arch,
        num_classes=num_classes,
        dropout=0.0,
        priors=priors,
        preprocess=PreprocessConfig(
            channel_order=layout["channel_order"],
            pixel_scale=1.0,
            mean=list(layout["mean"]),
            std=[1.0] * 3,
            resize="bilinear",
        ),
    )
    return make_checkpoint(ours, cfg, names, port)
