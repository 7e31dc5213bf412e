"""The MultiBox loss as it was before the fixed-shape rewrite (``nonzero`` + ``topk(k)``), kept as a reference.

Copied from ``ssd.loss.MultiBoxLoss.forward`` at commit 4c5e426 (``match`` is imported: its rule did
not change); ``tests/test_loss.py`` checks the fixed-shape loss and its gradients against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd.loss import match
from ssd.ops.boxes import encode


def reference_multibox_loss(
    outputs: dict[str, Tensor],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    priors_cxcywh: Tensor,
    iou_threshold: float = 0.5,
    neg_pos_ratio: float = 3.0,
    variances: tuple[float, float] = (0.1, 0.2),
    box_weight: float = 1.0,
) -> dict[str, Tensor]:
    loc, conf = outputs["loc"].float(), outputs["conf"].float()
    priors_cxcywh = priors_cxcywh.float()
    idx = match(gt_boxes.float(), gt_labels, priors_cxcywh, iou_threshold)  # [B, P]
    pos = idx >= 0
    labels = torch.gather(gt_labels, 1, idx.clamp(min=0)).masked_fill_(~pos, 0)  # [B, P], 0 = background
    num_pos_img = pos.sum(dim=1, keepdim=True)
    normalizer = num_pos_img.sum().clamp(min=1)

    # regression targets only where they are used
    b_idx, p_idx = pos.nonzero(as_tuple=True)
    loc_target = encode(gt_boxes[b_idx, idx[b_idx, p_idx]].float(), priors_cxcywh[p_idx], variances)
    loc_loss = F.smooth_l1_loss(loc[b_idx, p_idx], loc_target, reduction="sum")

    ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)
    # hard negative mining: the num_neg highest-loss background priors of each image
    num_neg = torch.minimum((neg_pos_ratio * num_pos_img).long(), pos.shape[1] - num_pos_img)  # [B, 1]
    k = int(num_neg.max())
    neg = torch.zeros_like(pos)
    if k > 0:
        mining = ce.detach().masked_fill(pos, -float("inf"))
        top = mining.topk(k, dim=1).indices  # [B, k], by decreasing loss
        neg.scatter_(1, top, torch.arange(k, device=top.device).expand_as(top) < num_neg)
    conf_loss = torch.where(pos | neg, ce, 0.0).sum()
    return {"loc": box_weight * loc_loss / normalizer, "conf": conf_loss / normalizer}
