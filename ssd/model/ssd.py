"""The SSD network: VGG16 trunk + extras + multibox heads, with priors derived from its own feature maps."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ssd.config import ModelConfig
from ssd.model.heads import MultiBoxHead
from ssd.model.priors import make_priors, num_priors_per_location, resolve_prior_layout
from ssd.model.vgg import Extras, VGG16Trunk


class SSD(nn.Module):
    """Single-shot detector. ``forward(images[B, 3, H, W])`` -> ``{"loc": [B, P, 4], "conf": [B, P, C]}``.

    Outputs are raw (offsets relative to ``self.priors``, logits with background = class 0).
    ``priors`` (``Tensor[P, 4]`` cxcywh, normalised) is a non-persistent buffer: it follows the
    device of the model and is rebuilt from the config, never loaded from a checkpoint.
    """

    priors: Tensor  # a buffer (register_buffer)

    def __init__(
        self, backbone: VGG16Trunk, extras: Extras, head: MultiBoxHead, priors: Tensor, input_size: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.extras = extras
        self.head = head
        self.input_size = input_size
        self.register_buffer("priors", priors, persistent=False)

    def features(self, images: Tensor) -> list[Tensor]:
        sources = self.backbone(images)
        return sources + self.extras(sources[-1])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.head(self.features(images))


def _meta_call(module: nn.Module, *args: Tensor):
    state = {k: v.to("meta") for k, v in itertools.chain(module.named_parameters(), module.named_buffers())}
    return functional_call(module, state, args)


def feature_sizes(backbone: VGG16Trunk, extras: Extras, input_size: int) -> list[tuple[int, int]]:
    """Spatial sizes of every source for a square input, found by running the layers on meta tensors
    (no compute, no memory): the priors can never drift from what the network produces."""
    x = torch.empty(2, 3, input_size, input_size, device="meta")  # batch 2: BN in train mode needs > 1 value
    try:
        with torch.no_grad():
            sources = _meta_call(backbone, x)
            sources += _meta_call(extras, sources[-1])
    except RuntimeError as e:
        raise ValueError(f"model.input_size {input_size} is too small for this network's layers: {e}") from None
    return [tuple(s.shape[-2:]) for s in sources]


def init_weights(model: SSD) -> None:
    """VGG trunk: Kaiming (torchvision VGG); extras and heads: Xavier uniform (ssd.pytorch, torchvision SSD)."""
    for part, init in ((model.backbone, "kaiming"), (model.extras, "xavier"), (model.head, "xavier")):
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_ssd(cfg: ModelConfig) -> SSD:
    """Build the detector described by ``cfg`` (see :class:`ssd.config.ModelConfig`)."""
    assert cfg.input_size is not None and cfg.extras is not None  # set by ModelConfig.__post_init__
    bn: dict[str, Any] = dict(bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum)
    backbone = VGG16Trunk(
        cfg.width,
        cfg.batch_norm,
        dropout=cfg.dropout,
        l2norm_scale=cfg.l2norm_scale,
        fc6_dilation=cfg.fc6_dilation,
        **bn,
    )
    extras = Extras(backbone.out_channels[-1], cfg.extras, cfg.width, "extras" in cfg.batch_norm, **bn)
    sizes = feature_sizes(backbone, extras, cfg.input_size)
    layout = resolve_prior_layout(cfg, len(sizes))
    priors = make_priors(sizes, (cfg.input_size, cfg.input_size), **layout)
    head = MultiBoxHead(
        backbone.out_channels + extras.out_channels,
        num_priors_per_location(layout["aspect_ratios"]),
        cfg.num_classes,
        "heads" in cfg.batch_norm,
        **bn,
    )
    model = SSD(backbone, extras, head, priors, cfg.input_size)
    init_weights(model)
    return model
