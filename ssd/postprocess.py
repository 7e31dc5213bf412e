"""From raw network outputs to detections (paper Sec. 3; torchvision ``SSD.postprocess_detections``).

Per image and class: softmax scores, keep score > ``score_threshold`` among the top
``topk_candidates`` priors, NMS at ``nms_threshold`` per class, then the best
``detections_per_image`` over all classes, boxes clipped and rescaled to the original image.

Everything up to NMS runs batched over images and classes. NMS itself is exact but only
looks at what can reach the output: the keep decision of a box depends only on higher-scored
boxes of its class, so running NMS on an image's ``T`` highest-scored candidates decides those
``T`` exactly; once ``detections_per_image`` of them survive, no lower-scored candidate can
enter the output. ``T`` starts at twice the output size and grows only when needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd.config import ModelConfig, PostprocessConfig
from ssd.ops.boxes import decode


class PostProcessor:
    def __init__(
        self,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        topk_candidates: int = 400,
        detections_per_image: int = 200,
        variances: Sequence[float] = (0.1, 0.2),
    ) -> None:
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.topk_candidates = topk_candidates
        self.detections_per_image = detections_per_image
        self.variances = tuple(variances)

    @torch.no_grad()
    def __call__(
        self,
        outputs: dict,
        priors_cxcywh: Tensor | None,
        input_size: tuple[int, int],
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """``outputs`` of the model for a batch -> one ``{"boxes", "scores", "labels"}`` per image.

        ``input_size`` is the network input ``(h, w)``; boxes are clipped to it, then rescaled to
        ``image_sizes[i] = (h, w)`` of each original image (input pixels when ``None``).
        Boxes are ``xyxy`` pixels, labels int64 in 1..C-1, sorted by decreasing score.
        ``outputs``: the network's ``loc`` / ``conf``, or an exported graph's decoded ``boxes`` (normalised,
        clipped) and softmax ``scores`` (:class:`ssd.onnx_model.OnnxSSD`, no priors needed), or the
        ``detections`` of a graph with NMS in it.
        """
        in_h, in_w = input_size
        if "detections" in outputs:
            return self.graph_detections(outputs["detections"], input_size, image_sizes)
        if "scores" in outputs:
            scale = outputs["boxes"].new_tensor([in_w, in_h, in_w, in_h])
            boxes, scores = outputs["boxes"].float() * scale, outputs["scores"].float()[..., 1:].transpose(1, 2)
        else:
            assert priors_cxcywh is not None  # the network's raw outputs are relative to its priors
            loc, conf = outputs["loc"].float(), outputs["conf"].float()
            scale = loc.new_tensor([in_w, in_h, in_w, in_h])
            boxes = decode(loc, priors_cxcywh.float(), self.variances) * scale  # [B, P, 4] input pixels
            boxes = torch.minimum(boxes.clamp(min=0), scale)
            scores = F.softmax(conf, dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, P]
        return self.select(boxes, scores, input_size, image_sizes)

    def select(
        self, boxes: Tensor, scores: Tensor, input_size: tuple[int, int], image_sizes: list[tuple[int, int]] | None
    ) -> list[dict[str, Tensor]]:
        """Candidates, NMS and the best per image from ``boxes [B, P, 4]`` (input pixels) and the foreground
        ``scores [B, C-1, P]``."""
        bsz, num_priors = boxes.shape[:2]
        in_h, in_w = input_size

        k = min(self.topk_candidates, num_priors)
        cand_scores, cand_prior = scores.topk(k, dim=-1)  # [B, C-1, k], sorted per class
        cand_scores = cand_scores.masked_fill(cand_scores <= self.score_threshold, -1.0).flatten(1)  # [B, (C-1)k]
        cand_prior = cand_prior.flatten(1)
        num_valid = (cand_scores > 0).sum(dim=1).tolist()

        t0 = min(2 * self.detections_per_image, cand_scores.shape[1])
        top_scores, top_idx = cand_scores.topk(t0, dim=1)  # [B, T0]
        # imported here: torchvision's import brings torch._dynamo (~2 s of a process's start); only NMS needs it
        from torchvision.ops import batched_nms

        results = []
        for i in range(bsz):
            t = min(t0, num_valid[i])
            s, idx = top_scores[i, :t], top_idx[i, :t]
            while True:
                labels = idx // k + 1
                b = boxes[i, cand_prior[i, idx]]
                keep = batched_nms(b, s, labels, self.nms_threshold)
                if len(keep) >= self.detections_per_image or t == num_valid[i]:
                    break
                t = min(4 * t, num_valid[i])
                s, idx = cand_scores[i].topk(t)
            keep = keep[: self.detections_per_image]
            b = b[keep]
            if image_sizes is not None:
                h, w = image_sizes[i]
                b = b * b.new_tensor([w / in_w, h / in_h, w / in_w, h / in_h])
            results.append({"boxes": b, "scores": s[keep], "labels": labels[keep]})
        return results

    def graph_detections(
        self, detections: list[tuple[Tensor, Tensor, Tensor]], input_size: tuple[int, int],
        image_sizes: list[tuple[int, int]] | None,
    ) -> list[dict[str, Tensor]]:  # fmt: skip
        """Per image ``(boxes`` normalised, ``scores``, ``labels)`` of a graph that ran NMS itself: those above
        the score threshold, best first, at most ``detections_per_image``, in pixels of each image."""
        results = []
        for i, (boxes, scores, labels) in enumerate(detections):
            h, w = image_sizes[i] if image_sizes is not None else input_size
            keep = scores > self.score_threshold
            order = scores[keep].argsort(descending=True, stable=True)[: self.detections_per_image]
            scaled = boxes[keep][order].float() * boxes.new_tensor([w, h, w, h], dtype=torch.float32)
            results.append({"boxes": scaled, "scores": scores[keep][order].float(), "labels": labels[keep][order]})
        return results


def build_postprocess(cfg: PostprocessConfig, model_cfg: ModelConfig) -> PostProcessor:
    return PostProcessor(
        cfg.score_threshold,
        cfg.nms_threshold,
        cfg.topk_candidates,
        cfg.detections_per_image,
        tuple(model_cfg.priors.variances),
    )
