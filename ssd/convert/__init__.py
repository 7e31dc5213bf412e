"""Converters from the weights people already have to our checkpoints (``ssd convert``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ssd.convert.caffe_ports import convert_caffe_port
from ssd.convert.common import load_state_dict_file
from ssd.convert.torchvision import convert_torchvision
from ssd.convert.vgg import convert_vgg

CONVERTERS: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "torchvision": lambda s, src: convert_torchvision(s, src),
    "amdegroot": lambda s, src: convert_caffe_port(s, "amdegroot", src),
    "lufficc": lambda s, src: convert_caffe_port(s, "lufficc", src),
    "vgg16": lambda s, src: convert_vgg(s, batch_norm=False, source=src),
    "vgg16_bn": lambda s, src: convert_vgg(s, batch_norm=True, source=src),
}


def convert_file(kind: str, src: str | os.PathLike) -> dict[str, Any]:
    """Read a foreign weights file and return our checkpoint dict (not yet saved)."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown source format {kind!r}; valid: {', '.join(CONVERTERS)}")
    return CONVERTERS[kind](load_state_dict_file(src), str(src))


__all__ = ["CONVERTERS", "convert_file", "convert_torchvision", "convert_caffe_port", "convert_vgg"]
