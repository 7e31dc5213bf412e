"""torchvision ImageNet ``vgg16`` / ``vgg16_bn`` classifier weights -> an SSD trunk initialisation.

fc6/fc7 are sub-sampled from the fully connected layers as in the paper (Sec. 3, "Base network";
the Caffe ``VGG_ILSVRC_16_layers_fc_reduced`` model): fc6 ``4096 x 25088`` is viewed as
``4096 x 512 x 7 x 7`` and keeps every 4th filter and every 3rd spatial tap (``1024 x 512 x 3 x 3``,
applied with dilation 6); fc7 keeps every 4th row and column (``1024 x 1024 x 1 x 1``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ssd.checkpoint import CheckpointError, make_checkpoint
from ssd.classes import VOC_CLASSES
from ssd.config import ModelConfig
from ssd.convert.common import OUR_VGG_CONVS, rename

# conv layers of torchvision's VGG16 `features`; with BN each conv is followed by its BatchNorm at i + 1
VGG16_CONV = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_BN_CONV = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
FC_KEYS = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def subsample_fc(fc6_w: Tensor, fc6_b: Tensor, fc7_w: Tensor, fc7_b: Tensor) -> dict[str, Tensor]:
    """ImageNet fc6/fc7 ``Linear`` weights -> SSD's reduced atrous fc6 and 1x1 fc7 conv weights."""
    fc6 = fc6_w.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous()  # [1024, 512, 3, 3]
    fc7 = fc7_w[::4, ::4].reshape(1024, 1024, 1, 1).contiguous()
    return {
        "backbone.fc6.conv.weight": fc6,
        "backbone.fc6.conv.bias": fc6_b[::4].contiguous(),
        "backbone.fc7.conv.weight": fc7,
        "backbone.fc7.conv.bias": fc7_b[::4].contiguous(),
    }


def convert_vgg(state: dict[str, Tensor], batch_norm: bool, source: str = "vgg16 state_dict") -> dict[str, Any]:
    """Convert ``vgg16`` (``batch_norm=False``) or ``vgg16_bn`` weights into a trunk checkpoint.

    The result holds only ``backbone.*`` tensors (for ``model.init_backbone``); its config is an
    SSD300 with BN in conv1..conv5 for ``vgg16_bn`` and ImageNet preprocessing. torchvision's
    ``vgg16_bn`` convs carry a bias that BN makes redundant; it is folded into the BN running mean
    (``BN(conv(x) + b) == BN'(conv(x))`` with ``mean' = mean - b``), since our convs before BN have none.
    """
    convs = VGG16_BN_CONV if batch_norm else VGG16_CONV
    key_map = {}
    for i, ours in zip(convs, OUR_VGG_CONVS, strict=True):
        key_map[f"features.{i}.weight"] = f"{ours}.weight"
        key_map[f"features.{i}.bias"] = f"{ours}.bias"
        if batch_norm:
            bn = ours.removesuffix(".conv") + ".bn"
            key_map.update({f"features.{i + 1}.{k}": f"{bn}.{k}" for k in BN_KEYS})
    classifier = {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    trunk = rename({k: v for k, v in state.items() if k not in classifier}, key_map, source)
    missing = [k for k in FC_KEYS if k not in state]  # classifier.6 (the 1000-way layer) is not used
    if missing:
        raise CheckpointError(f"{source}: missing fully connected weights {missing} needed for fc6/fc7")
    if state["classifier.0.weight"].shape != (4096, 25088):
        raise CheckpointError(
            f"{source}: classifier.0.weight has shape {tuple(state['classifier.0.weight'].shape)}, "
            "expected (4096, 25088)"
        )
    if batch_norm:
        for ours in OUR_VGG_CONVS:
            bn = ours.removesuffix(".conv") + ".bn"
            trunk[f"{bn}.running_mean"] = trunk[f"{bn}.running_mean"] - trunk.pop(f"{ours}.bias")
    trunk.update(subsample_fc(*(state[k] for k in FC_KEYS)))
    blocks = ["conv1", "conv2", "conv3", "conv4", "conv5"] if batch_norm else []
    cfg = ModelConfig(arch="ssd300", batch_norm=blocks, dropout=0.0)
    return make_checkpoint(trunk, cfg, VOC_CLASSES, "vgg16_bn" if batch_norm else "vgg16") | {"kind": "backbone"}
