"""Fine-tuning onto other classes: the class heads' rows matched by name, not by position.

The class head of a level is a conv with ``A * C`` output channels, anchor-major (channel ``a * C + c``
scores class ``c`` for anchor ``a``; class 0 is the background), followed with head BN by a BN layer
with the same channels. A checkpoint trained on other classes has other rows: a row is copied where
the class names match (case-insensitive, in any order), the background always, and the others keep
the new model's fresh initialisation. Loading by position instead (what name-and-shape loading does
when the counts agree) would start each new class from an unrelated old one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from ssd.classes import class_key

log = logging.getLogger("ssd.train")

CLASS_PREFIXES = ("head.conf.", "head.conf_bn.")  # tensors with a per-class axis (the output channels)


def class_pairs(model_classes: Sequence[str], source_classes: Sequence[str]) -> list[tuple[int, int]] | None:
    """``[(model row, source row), ...]`` (1-based; the background's (0, 0) first) of the classes whose
    names match, or None when both lists are the same classes in the same order (rows load as they are).
    A name that appears twice in either list (torchvision's ``N/A``) never matches."""
    mine, theirs = [class_key(n) for n in model_classes], [class_key(n) for n in source_classes]
    if mine == theirs:
        return None
    repeated = {k for k, n in Counter(mine).items() if n > 1} | {k for k, n in Counter(theirs).items() if n > 1}
    row_of = {k: i for i, k in enumerate(theirs, 1) if k not in repeated}
    return [(0, 0)] + [(i, row_of[k]) for i, k in enumerate(mine, 1) if k in row_of]


def remap_class_rows(fresh: Tensor, source: Tensor, pairs: list[tuple[int, int]], classes: int) -> Tensor | None:
    """``fresh`` (the model's tensor, ``[A * classes, ...]``) with the rows of ``pairs`` taken from ``source``
    (``[A * C_source, ...]``); None when the two do not have the same anchors and trailing shape."""
    if fresh.shape[0] % classes or fresh.shape[1:] != source.shape[1:]:
        return None
    anchors = fresh.shape[0] // classes
    if source.shape[0] % anchors:
        return None
    out = fresh.clone().reshape(anchors, classes, *fresh.shape[1:])
    src = source.reshape(anchors, source.shape[0] // anchors, *source.shape[1:])
    rows, from_rows = (torch.tensor(side) for side in zip(*pairs, strict=True))
    out[:, rows] = src[:, from_rows].to(out.dtype)
    return out.reshape(fresh.shape)


def load_class_rows(
    own: dict[str, Tensor],
    state: dict[str, Tensor],
    model_classes: Sequence[str],
    source_classes: Sequence[str],
    path: str,
) -> tuple[dict[str, Tensor], list[str]] | None:
    """The per-class tensors of ``state`` remapped onto ``own`` by class name (``{key: tensor}``, and the
    keys left fresh), or None when the class lists are the same (load as usual). Logs the classes."""
    pairs = class_pairs(model_classes, source_classes)
    if pairs is None:
        return None
    keys = [k for k in state if k.startswith(CLASS_PREFIXES) and k in own and own[k].dim() > 0]
    if len(pairs) == 1:
        log.info("init from %s: no class name in common with its classes: the class heads start fresh", path)
        return {}, keys
    update, fresh = {}, []
    for key in keys:
        remapped = remap_class_rows(own[key], state[key], pairs, len(model_classes) + 1)
        if remapped is None:
            fresh.append(key)
        else:
            update[key] = remapped
    reused = [model_classes[i - 1] for i, _ in pairs[1:]]
    new = [name for i, name in enumerate(model_classes, 1) if i not in {m for m, _ in pairs}]
    log.info(
        "init from %s: class head rows matched by name: reused %s (and the background), fresh %s",
        path,
        ", ".join(reused),
        ", ".join(new) or "-",
    )
    return update, fresh
