"""Matching of ground truth to priors and the MultiBox loss (paper Sec. 2.2), batched on the model's device.

Targets are padded: ``gt_boxes: Tensor[B, G, 4]`` (xyxy, normalised like the priors) and
``gt_labels: Tensor[B, G]`` (int64, 1..C-1; rows with label 0 are padding, since background is
never a ground-truth class). An image with no objects is a row of padding only. :func:`pad_targets`
(in :mod:`ssd.ops.boxes`, where the data's collate reaches it too) makes them from per-image lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd.config import LossConfig, ModelConfig
from ssd.ops.boxes import box_iou, cxcywh_to_xyxy, encode, pad_targets

__all__ = ["MultiBoxLoss", "build_loss", "match", "pad_targets"]


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
    # padding rows become empty boxes (whatever they held, NaN included): IoU 0 with every prior, below any valid
    # box's IoU or tied with it (max takes the first, and pad_targets puts the objects first); a prior whose best
    # row is padding is background, and padding is never forced (gt_index below). Cheaper than masking [B, G, P].
    iou = box_iou(gt_boxes.masked_fill(~valid[..., None], 0.0), cxcywh_to_xyxy(priors_cxcywh))  # [B, G, P]
    best_gt_iou, best_gt = iou.max(dim=1)  # [B, P]
    matched = torch.where((best_gt_iou >= iou_threshold) & valid.gather(1, best_gt), best_gt, -1)
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
    without any positive gives a finite loss (zero box loss). Returns ``{"loc", "conf"}``. Every
    shape follows from the inputs' shapes (no ``nonzero``, no ``k`` read back from the device),
    so a training step never waits on the accelerator here.
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        variances: Sequence[float] = (0.1, 0.2),
        box_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.variances = tuple(variances)
        self.box_weight = box_weight
        self.static_shapes: bool | None = None  # None: decided per call (_static_shapes)

    def forward(
        self, outputs: dict[str, Tensor], gt_boxes: Tensor, gt_labels: Tensor, priors_cxcywh: Tensor
    ) -> dict[str, Tensor]:
        loc, conf = outputs["loc"].float(), outputs["conf"].float()
        priors_cxcywh = priors_cxcywh.float()
        idx = match(gt_boxes.float(), gt_labels, priors_cxcywh, self.iou_threshold)  # [B, P]
        pos = idx >= 0
        labels = torch.gather(gt_labels, 1, idx.clamp(min=0)).masked_fill_(~pos, 0)  # [B, P], 0 = background
        num_pos_img = pos.sum(dim=1, keepdim=True)
        normalizer = num_pos_img.sum().clamp(min=1)

        # box loss at every prior, kept at the positives: fixed shapes, no nonzero() (a host sync). Per prior, encode
        # is affine in the encoding against the unit prior, encode(box, prior) = (encode(box, unit) - encode(prior,
        # unit)) * (1/w, 1/h, 1, 1), so the [B, P, 4] targets cost a row lookup, a subtraction and a product (~2x
        # faster on CPU than encode on [B, P, 4]). Padding rows are zeroed first: the target of an unmatched prior
        # (it looks up row 0, maybe padding) is finite, and torch.where gives it a zero loss and a zero gradient.
        b, g = gt_labels.shape
        unit = torch.cat((priors_cxcywh.new_zeros(2), priors_cxcywh.new_ones(2)))  # cxcywh; no host-to-device copy
        # [B, G, 4]
        gt_unit = encode(gt_boxes.float().masked_fill(gt_labels[..., None] <= 0, 0.0), unit, self.variances)
        rows = (idx.clamp(min=0) + g * torch.arange(b, device=idx.device)[:, None]).flatten()  # into [B * G]
        priors_scale = torch.cat((1 / priors_cxcywh[:, 2:], torch.ones_like(priors_cxcywh[:, 2:])), dim=1)  # [P, 4]
        priors_unit = encode(cxcywh_to_xyxy(priors_cxcywh), unit, self.variances)  # [P, 4]
        loc_target = (gt_unit.flatten(0, 1).index_select(0, rows).view_as(loc) - priors_unit) * priors_scale
        loc_loss = torch.where(pos, F.smooth_l1_loss(loc, loc_target, reduction="none").sum(dim=2), 0.0).sum()

        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)
        # hard negative mining: the num_neg highest-loss background priors of each image. topk takes one k for the
        # batch, so each row is padded with k - num_neg entries of +inf and num_neg of -inf: the top k of a padded
        # row are then the +inf and the row's num_neg highest losses (ties: any of the equal losses; the count and
        # the sum are exact). sorted=False selects in O(P), ~3x faster on CPU than ranking by a sort. k is P, a
        # shape, on an accelerator and under torch.compile (reading the batch's largest num_neg back would be a
        # host sync); in eager mode on the CPU, where the value is already on the host, it is that largest num_neg
        # (the same selection, ~3x cheaper).
        p = pos.shape[1]
        num_neg = torch.minimum((self.neg_pos_ratio * num_pos_img).long(), p - num_pos_img)  # [B, 1]
        k = p if self._static_shapes(conf) else int(num_neg.max())
        padding = torch.where(torch.arange(k, device=pos.device) < k - num_neg, float("inf"), -float("inf"))  # [B, k]
        # of [B, P + k]
        top = torch.cat((ce.masked_fill(pos, -float("inf")), padding), dim=1).topk(k, dim=1, sorted=False)
        conf_loss = torch.where(pos, ce, 0.0).sum() + torch.where(top.indices < p, top.values, 0.0).sum()
        return {"loc": self.box_weight * loc_loss / normalizer, "conf": conf_loss / normalizer}

    def _static_shapes(self, t: Tensor) -> bool:
        """Whether every shape must follow from the inputs' shapes: off the CPU, and while compiling
        (``static_shapes``, when set, decides instead: the tests run the accelerator's path on the CPU)."""
        if self.static_shapes is not None:
            return self.static_shapes
        return t.device.type != "cpu" or torch.compiler.is_compiling()


def build_loss(loss_cfg: LossConfig, model_cfg: ModelConfig) -> MultiBoxLoss:
    return MultiBoxLoss(
        loss_cfg.iou_threshold, loss_cfg.neg_pos_ratio, tuple(model_cfg.priors.variances), loss_cfg.box_weight
    )
