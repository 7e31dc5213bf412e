"""Pure tensor functions on boxes.

Convention: a box is a row of 4 floats in one of torchvision's formats
``xyxy`` (x1, y1, x2, y2), ``xywh`` (x1, y1, w, h, top-left corner) or ``cxcywh``
(centre, width, height). Inside the model boxes are ``xyxy`` (targets) or ``cxcywh``
(priors) normalised to [0, 1] of the network input; at the edges (datasets, detections)
they are ``xyxy`` pixels of the original image. Every function accepts any leading batch
dimensions (``Tensor[..., 4]``), keeps device and dtype, and never writes into its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# torchvision det_utils: exp(dw) is clamped so a predicted box is at most 1000/16 times its prior
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes, ``Tensor[..., 4] -> Tensor[...]``; degenerate boxes give 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``xyxy`` boxes: ``Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M]``.

    Leading dimensions broadcast (e.g. padded targets ``[B, G, 4]`` against priors ``[P, 4]``).
    Pairs with zero union (two empty boxes) give 0, never NaN.
    """
    # per-coordinate [..., N, 1] / [..., 1, M] operands: ~3x faster on CPU than [..., N, M, 2] views
    x11, y11, x12, y12 = (c.unsqueeze(-1) for c in boxes1.unbind(-1))
    x21, y21, x22, y22 = (c.contiguous().unsqueeze(-2) for c in boxes2.unbind(-1))
    inter = torch.minimum(x12, x22).sub_(torch.maximum(x11, x21)).clamp_(min=0)  # width  [..., N, M]
    inter.mul_(torch.minimum(y12, y22).sub_(torch.maximum(y11, y21)).clamp_(min=0))
    union = (box_area(boxes1).unsqueeze(-1) + box_area(boxes2).unsqueeze(-2)).sub_(inter)
    return inter.div_(union.clamp_(min=torch.finfo(union.dtype).tiny))


def encode(boxes_xyxy: Tensor, priors_cxcywh: Tensor, variances: Sequence[float] = (0.1, 0.2)) -> Tensor:
    """Regression targets of ``xyxy`` boxes relative to ``cxcywh`` priors (same frame), ``[..., 4]``.

    ``(dx, dy) = (c - c_prior) / (v0 * wh_prior)``, ``(dw, dh) = log(wh / wh_prior) / v1``
    (paper eq. 2; torchvision BoxCoder with weights (10, 10, 5, 5) == variances (0.1, 0.2)).
    Degenerate boxes are floored at a tiny size so the log stays finite.
    """
    c = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=1e-6)
    dxy = (c - priors_cxcywh[..., :2]) / (variances[0] * priors_cxcywh[..., 2:])
    dwh = torch.log(wh / priors_cxcywh[..., 2:]) / variances[1]
    return torch.cat((dxy, dwh), dim=-1)


def decode(deltas: Tensor, priors_cxcywh: Tensor, variances: Sequence[float] = (0.1, 0.2)) -> Tensor:
    """Inverse of :func:`encode`: deltas ``[..., 4]`` + priors ``cxcywh`` -> boxes ``xyxy`` (priors' frame).

    ``dw, dh`` are clamped at log(1000/16) before ``exp`` as in torchvision, so a wild
    prediction cannot overflow to inf.
    """
    dxy = deltas[..., :2] * variances[0]
    dwh = (deltas[..., 2:] * variances[1]).clamp(max=BBOX_XFORM_CLIP)
    c = priors_cxcywh[..., :2] + dxy * priors_cxcywh[..., 2:]
    half_wh = 0.5 * torch.exp(dwh) * priors_cxcywh[..., 2:]
    return torch.cat((c - half_wh, c + half_wh), dim=-1)


def pad_targets(boxes: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image ``[N_i, 4]`` boxes / ``[N_i]`` labels -> padded ``[B, G, 4]`` / ``[B, G]`` (G >= 1)."""
    g = max([1] + [len(b) for b in boxes])
    ref = boxes[0] if boxes else torch.zeros(0, 4)
    out_boxes = ref.new_zeros(len(boxes), g, 4)
    out_labels = torch.zeros(len(boxes), g, dtype=torch.int64, device=ref.device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        out_boxes[i, : len(b)] = b
        out_labels[i, : len(b)] = lab
    return out_boxes, out_labels
