"""Shared machinery of the weight converters: load a foreign file, rename keys, report mismatches."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from ssd.checkpoint import CheckpointError, load_file
from ssd.model.vgg import TRUNK_LAYERS

# Our names of the 15 trunk convolutions, in VGG order (conv1_1 .. conv5_3, fc6, fc7)
OUR_TRUNK = [f"backbone.{name}.conv" for name in TRUNK_LAYERS]
OUR_VGG_CONVS = OUR_TRUNK[:13]  # conv1_1 .. conv5_3: ImageNet VGG16's features (its fc6/fc7 are subsampled)
# ssd.pytorch `vgg` ModuleList / lufficc `backbone.vgg`: indices of those 15 convolutions
CAFFE_VGG_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A ``.pth`` holding a state_dict, or a training checkpoint with it under ``model``/``state_dict``."""
    obj = load_file(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP saves


def prefix_map(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Module-prefix pairs (src, dst) -> a dict that maps ``src.weight``/``src.bias`` keys."""
    return {f"{s}.{p}": f"{d}.{p}" for s, d in pairs for p in ("weight", "bias")}


def rename(state: dict[str, Tensor], key_map: dict[str, str], source: str) -> dict[str, Tensor]:
    """Rename every key with ``key_map``; any key not in the map, or any map entry absent from
    ``state``, is an error naming the keys (nothing is silently skipped)."""
    unexpected = [k for k in state if k not in key_map]
    missing = [k for k in key_map if k not in state]
    if unexpected or missing:
        parts = []
        for label, items in (("unexpected keys", unexpected), ("missing keys", missing)):
            if items:
                more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
                parts.append(f"{label}: {', '.join(items[:6])}{more}")
        raise CheckpointError(f"{source}: not the expected layout; " + "; ".join(parts))
    return {key_map[k]: v for k, v in state.items()}


def count_indexed(state: dict[str, Any], prefix: str) -> int:
    """Number of ``prefix{i}.weight`` entries for i = 0, 1, ... (e.g. heads per feature level)."""
    n = 0
    while f"{prefix}{n}.weight" in state:
        n += 1
    return n


def head_num_classes(state: dict[str, Tensor], conf0: str, loc0: str, source: str) -> int:
    """Classes (with background) from the first level's conf/loc channel counts."""
    if conf0 not in state or loc0 not in state:
        raise CheckpointError(f"{source}: missing {conf0 if conf0 not in state else loc0}")
    anchors = state[loc0].shape[0] // 4
    return state[conf0].shape[0] // anchors
