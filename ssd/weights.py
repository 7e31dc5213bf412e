"""Weights by name or URL: wherever a weights file is read (``--weights``, ``ssd convert`` SRC, ``model.init``,
``model.init_backbone``), a ``torchvision:NAME`` or an ``http(s)://`` / ``file://`` URL works like a path.

A name resolves to its published URL through torchvision's own weight enums; the file is downloaded once
(:mod:`ssd.download`: hash-checked, never half-written), converted with :mod:`ssd.convert`, and the
converted checkpoint cached: the second use is offline and instant. A URL is fetched to the cache as it is
(it must hold an ssd checkpoint or an ``.onnx`` where one is read; a foreign file goes through
``ssd convert --from KIND URL``).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ssd.checkpoint import save_checkpoint
from ssd.convert import convert_file
from ssd.download import check_hash, fetch_url, first_process_per_machine, is_url, url_file_name, weights_cache

log = logging.getLogger("ssd.weights")

PREFIX = "torchvision:"


@dataclass(frozen=True)
class Published:
    """Weights torchvision publishes, and how ours are made from them."""

    name: str  # what users type after torchvision:
    converter: str  # the ssd convert --from kind
    enum: str  # module:Enum.MEMBER of torchvision's weight enums
    expects: str  # classes, preprocessing and input size of the converted checkpoint

    def weights(self):
        module, member = self.enum.split(":")
        enum_name, value = member.split(".")
        return getattr(getattr(importlib.import_module(module), enum_name), value)

    @property
    def url(self) -> str:
        return self.weights().url

    def converted_path(self) -> Path:
        """Where its converted checkpoint is cached: ``weights_cache()/<published file name>.ssd.pt``."""
        return weights_cache() / (url_file_name(self.url).removesuffix(".pth") + ".ssd.pt")


PUBLISHED = {
    p.name: p
    for p in (
        Published(
            "ssd300_vgg16_coco",
            "torchvision",
            "torchvision.models.detection:SSD300_VGG16_Weights.COCO_V1",
            "detector: 91 COCO category ids (80 used), 300 px, RGB 0..1 minus torchvision's mean, resized after",
        ),
        Published(
            "vgg16",
            "vgg16",
            "torchvision.models:VGG16_Weights.IMAGENET1K_V1",
            "backbone for model.init_backbone: ImageNet VGG16 (conv1_1..conv5_3), RGB ImageNet mean/std, any size",
        ),
        Published(
            "vgg16_bn",
            "vgg16_bn",
            "torchvision.models:VGG16_BN_Weights.IMAGENET1K_V1",
            "backbone for model.init_backbone: ImageNet VGG16-BN (BN in conv1..conv5), RGB ImageNet mean/std, any size",
        ),
    )
}


def published(spec: str) -> Published:
    name = spec.removeprefix(PREFIX)
    if name not in PUBLISHED:
        valid = ", ".join(PREFIX + n for n in PUBLISHED)
        raise ValueError(f"unknown weights name {spec!r}; valid: {valid} (ssd weights list)")
    return PUBLISHED[name]


def manual_route(pub: Published) -> str:
    return f"download {pub.url} elsewhere, then: ssd convert --from {pub.converter} FILE --out CKPT, and use CKPT"


def resolve_weights(spec: str | os.PathLike) -> str:
    """A local file for ``spec``: ``torchvision:NAME`` -> the cached converted checkpoint (downloaded and
    converted on first use); a URL -> its cached download; a path -> itself, hash-checked when its name
    carries a hash (``name-<hex>.pth``)."""
    text = str(spec)
    if text.startswith(PREFIX):
        return str(converted(published(text)))
    if is_url(text):
        with first_process_per_machine():
            return str(fetch_url(text))
    path = Path(text)
    if path.is_file():
        check_hash(path)
    return text


def raw_weights(spec: str | os.PathLike) -> str:
    """A local copy of the file ``spec`` names as published, not converted (``ssd convert``'s SRC)."""
    text = str(spec)
    if text.startswith(PREFIX):
        pub = published(text)
        with first_process_per_machine():
            return str(fetch_url(pub.url, manual_route(pub)))
    return resolve_weights(text)


def converted(pub: Published) -> Path:
    """The cached checkpoint converted from ``pub``: ``weights_cache()/<file>.ssd.pt``, made on first use."""
    out = pub.converted_path()
    with first_process_per_machine():
        if not out.is_file():
            raw = fetch_url(pub.url, manual_route(pub))
            save_checkpoint(convert_file(pub.converter, raw), out)  # atomic: never a half-written file
            log.info("converted %s%s to %s", PREFIX, pub.name, out)
    return out


def weights_table() -> list[dict]:
    """``ssd weights list``'s rows: name, converter, URL, what the converted weights expect, cached or not."""
    rows = []
    for pub in PUBLISHED.values():
        w = pub.weights()  # torchvision's metadata has no licence field: its recipe page is where the terms are
        cached = pub.converted_path()
        rows.append({"name": PREFIX + pub.name, "converter": pub.converter, "url": w.url, "expects": pub.expects,
                     "cached": str(cached) if cached.is_file() else None,
                     "terms": f"see {w.meta.get('recipe', w.url)}"})  # fmt: skip
    return rows
