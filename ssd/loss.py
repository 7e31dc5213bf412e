"""Matching of ground truth to priors and the MultiBox loss (paper Sec. 2.2), batched on the model's device.

Targets are padded: ``gt_boxes: Tensor[B, G, 4]`` (xyxy, normalised like the priors) and
``gt_labels: Tensor[B, G]`` (int64, 1..C-1; rows with label 0 are padding, since background is
never a ground-truth class). An image with no objects is a row of padding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd.config import LossConfig, ModelConfig
from ssd.ops.boxes import box_iou, cxcywh_to_xyxy, encode


def pad_targets(boxes: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image ``[N_i, 4]`` boxes / ``[N_i]`` labels -> padded ``[B, G, 4]`` / ``[B, G]`` (G >= 1)."""
    g = max([1] + [len(b) for b in boxes])
    ref = boxes[0] if boxes else torch.zeros(0, 4)
    out_boxes = ref.new_zeros(len(boxes), g, 4)
    out_labels = torch.zeros(len(boxes), g, dtype=torch.int64, device=ref.device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out_boxes[i, : len(b)] = b
        out_labels[i, : len(b)] = lab
    return out_boxes, out_labels


def match(gt_boxes: Tensor, gt_labels: Tensor, priors_cxcywh: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Index of the ground truth each prior is assigned to, ``Tensor[B, P]`` (-1: background).

    Rule (paper Sec. 2.2, as ssd.pytorch and torchvision): every ground truth first gets its
    best prior (forced, whatever the IoU); every other prior is positive for its best ground
    truth if IoU >= ``iou_threshold``. When two ground truths share a best prior the later one
    wins, deterministically (``scatter_reduce`` amax, no write races on GPU).
    """
    b, g = gt_labels.shape
    p = priors_cxcywh.shape[0]
    valid = gt_labels > 0  # [B, G]
    iou = box_iou(gt_boxes, cxcywh_to_xyxy(priors_cxcywh))  # [B, G, P]
    iou.masked_fill_(~valid[..., None], -1.0)
    best_gt_iou, best_gt = iou.max(dim=1)  # [B, P]
    matched = torch.where(best_gt_iou >= iou_threshold, best_gt, -1)
    best_prior_iou, best_prior = iou.max(dim=2)  # [B, G]
    # a box overlapping no prior at all (zero area, off the image) is not forced onto prior 0
    gt_index = torch.arange(g, device=gt_labels.device).expand(b, g).masked_fill(~valid | (best_prior_iou <= 0), -1)
    forced = torch.full((b, p), -1, dtype=torch.int64, device=gt_labels.device)
    forced.scatter_reduce_(1, best_prior, gt_index, reduce="amax")
    return torch.where(forced >= 0, forced, matched)


class MultiBoxLoss(nn.Module):
    """Smooth-L1 on positives + softmax cross-entropy with hard negative mining.

    Negatives are the highest-loss background priors, ``neg_pos_ratio`` times the positives of
    the same image. Both terms are divided by ``max(1, positives in the batch)``, so a batch
    without any positive gives a finite loss (zero box loss). Returns ``{"loc", "conf"}``.
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        variances: tuple[float, float] = (0.1, 0.2),
        box_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.variances = tuple(variances)
        self.box_weight = box_weight

    def forward(self, outputs: dict[str, Tensor], gt_boxes: Tensor, gt_labels: Tensor, priors_cxcywh: Tensor) -> dict[str, Tensor]:
        loc, conf = outputs["loc"].float(), outputs["conf"].float()
        priors_cxcywh = priors_cxcywh.float()
        idx = match(gt_boxes.float(), gt_labels, priors_cxcywh, self.iou_threshold)  # [B, P]
        pos = idx >= 0
        labels = torch.gather(gt_labels, 1, idx.clamp(min=0)).masked_fill_(~pos, 0)  # [B, P], 0 = background
        num_pos_img = pos.sum(dim=1, keepdim=True)
        normalizer = num_pos_img.sum().clamp(min=1)

        # regression targets only where they are used
        b_idx, p_idx = pos.nonzero(as_tuple=True)
        loc_target = encode(gt_boxes[b_idx, idx[b_idx, p_idx]].float(), priors_cxcywh[p_idx], self.variances)
        loc_loss = F.smooth_l1_loss(loc[b_idx, p_idx], loc_target, reduction="sum")

        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)
        # hard negative mining: the num_neg highest-loss background priors of each image
        num_neg = torch.minimum((self.neg_pos_ratio * num_pos_img).long(), pos.shape[1] - num_pos_img)  # [B, 1]
        k = int(num_neg.max())
        neg = torch.zeros_like(pos)
        if k > 0:
            mining = ce.detach().masked_fill(pos, -float("inf"))
            top = mining.topk(k, dim=1).indices  # [B, k], by decreasing loss
            neg.scatter_(1, top, torch.arange(k, device=top.device).expand_as(top) < num_neg)
        conf_loss = torch.where(pos | neg, ce, 0.0).sum()
        return {"loc": self.box_weight * loc_loss / normalizer, "conf": conf_loss / normalizer}


def build_loss(loss_cfg: LossConfig, model_cfg: ModelConfig) -> MultiBoxLoss:
    return MultiBoxLoss(loss_cfg.iou_threshold, loss_cfg.neg_pos_ratio, tuple(model_cfg.priors.variances), loss_cfg.box_weight)
