"""ONNX export: the network with its normalisation and prior decoding, optionally with per-class NMS.

Graph input ``images``: float32 ``[B, 3, S, S]``, RGB, 0..255, already resized to the model's
``S x S`` input (the caller resizes; see docs/inference.md). The graph applies the checkpoint's
preprocessing (channel order, scale, mean, std).

Outputs without NMS (the default; NMS left to the runtime):
  ``boxes``  float32 ``[B, P, 4]`` xyxy normalised to [0, 1] of the input and clipped to it;
             multiply by an original image's ``(W, H, W, H)`` to get its pixels (the resize is a
             plain stretch, so normalised coordinates are the same in both frames);
  ``scores`` float32 ``[B, P, C]`` softmax over the C classes, column 0 = background.

Outputs with ``nms=True`` (ONNX ``NonMaxSuppression``, per image and class): ``det_boxes``
``[K, 4]`` (normalised xyxy), ``det_scores`` ``[K]``, ``det_labels`` ``[K]`` int64 (1..C-1) and
``det_batch`` ``[K]`` int64 (image index in the batch). Differences from :class:`PostProcessor`:
no top-``topk_candidates`` pre-selection per class and ``detections_per_image`` caps each class,
not the whole image (ONNX's ``max_output_boxes_per_class``).

Exported with PyTorch's TorchScript-based exporter (``dynamo=False``): it needs only the
``onnx`` package, where the newer ``torch.export`` exporter also needs ``onnxscript``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd.config import PostprocessConfig, PreprocessConfig
from ssd.ops.boxes import decode

if TYPE_CHECKING:
    from ssd.model.ssd import SSD

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 11, 20  # NonMaxSuppression needs 11; the TorchScript exporter stops at 20


class DecodedSSD(nn.Module):
    """``images [B, 3, S, S]`` RGB 0..255 -> ``(boxes [B, P, 4] normalised xyxy, scores [B, P, C] softmax)``."""

    mean: Tensor  # buffers (register_buffer)
    std: Tensor

    def __init__(self, model: SSD, preprocess: PreprocessConfig, variances: Sequence[float] = (0.1, 0.2)) -> None:
        super().__init__()
        self.model = model
        self.bgr = preprocess.channel_order == "bgr"
        self.pixel_scale = float(preprocess.pixel_scale)
        self.variances = tuple(float(v) for v in variances)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:  # a subclass returns four
        x = images.flip(1) if self.bgr else images
        x = (x * self.pixel_scale - self.mean) / self.std
        out = self.model(x)
        boxes = decode(out["loc"], self.model.priors, self.variances).clamp(0.0, 1.0)  # [B, P, 4]
        return boxes, F.softmax(out["conf"], dim=-1)


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (``selected [K, 3]`` = batch, class, box) with a PyTorch twin for tracing.

    ``boxes [B, P, 4]``, ``scores [B, C, P]``; keeps score > ``score_threshold``, suppresses IoU >
    ``iou_threshold`` within a class, at most ``max_per_class`` per image and class.
    """

    @staticmethod
    def forward(
        ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float, score_threshold: float
    ) -> Tensor:
        from torchvision.ops import batched_nms  # only here: torchvision's import costs ~2 s of a process's start

        rows = []
        for b in range(boxes.shape[0]):
            cls, idx = torch.nonzero(scores[b] > score_threshold, as_tuple=True)
            keep = batched_nms(boxes[b, idx], scores[b, cls, idx], cls, iou_threshold)
            cls, idx = cls[keep], idx[keep]
            for c in cls.unique():  # ONNX order: batch, class, decreasing score
                sel = idx[cls == c][:max_per_class]
                rows.append(torch.stack([torch.full_like(sel, b), torch.full_like(sel, c), sel], 1))
        return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
            center_point_box_i=0,
        )


class DecodedSSDWithNMS(DecodedSSD):
    """:class:`DecodedSSD` + per-class NMS -> ``(det_boxes [K, 4], det_scores [K], det_labels [K], det_batch [K])``."""

    def __init__(
        self,
        model: SSD,
        preprocess: PreprocessConfig,
        postprocess: PostprocessConfig,
        variances: Sequence[float] = (0.1, 0.2),
    ) -> None:
        super().__init__(model, preprocess, variances)
        self.score_threshold = float(postprocess.score_threshold)
        self.nms_threshold = float(postprocess.nms_threshold)
        self.max_per_class = int(postprocess.detections_per_image)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores = super().forward(images)
        fg = scores[:, :, 1:].transpose(1, 2)  # [B, C-1, P], background dropped
        selected = _NonMaxSuppression.apply(boxes, fg, self.max_per_class, self.nms_threshold, self.score_threshold)
        batch, cls, prior = selected[:, 0], selected[:, 1], selected[:, 2]
        num_fg, num_priors = fg.shape[1], fg.shape[2]
        # flat gathers: the exporter's translation of multi-tensor advanced indexing picked wrong rows
        det_boxes = boxes.reshape(-1, 4).index_select(0, batch * num_priors + prior)
        det_scores = fg.reshape(-1).index_select(0, (batch * num_fg + cls) * num_priors + prior)
        return det_boxes, det_scores, cls + 1, batch


def export_onnx(
    model: SSD,
    preprocess: PreprocessConfig,
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = False,
    nms: PostprocessConfig | None = None,
    variances: Sequence[float] = (0.1, 0.2),
    batch_size: int = 1,
) -> DecodedSSD:
    """Export eval-mode ``model`` to ``path``; ``nms`` (a post-processing config) adds NMS to the graph.

    Returns the wrapped PyTorch module that was exported (the reference for comparisons).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    if nms is None:
        wrapped = DecodedSSD(model, preprocess, variances).eval()
    else:
        wrapped = DecodedSSDWithNMS(model, preprocess, nms, variances).eval()
    size = int(model.input_size)
    example = torch.rand(batch_size, 3, size, size, device=model.priors.device) * 255.0
    outputs = ["boxes", "scores"] if nms is None else ["det_boxes", "det_scores", "det_labels", "det_batch"]
    axes = None
    if dynamic_batch:
        axes = {"images": {0: "batch"}} | ({"boxes": {0: "batch"}, "scores": {0: "batch"}} if nms is None else {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export": chosen, see above
        # the NMS twin's Python loop; the graph uses the ONNX op
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # "torch.jit.script is deprecated", from the exporter's internals
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=axes,
        )
    return wrapped


def check_onnx(path: str | Path, reference: DecodedSSD, batch_size: int = 1, seed: int = 0) -> dict[str, float]:
    """``onnx.checker`` on the file, then onnxruntime vs ``reference`` on random images.

    Returns the max abs difference per output (``boxes``, ``scores``). With NMS in the graph the
    detections are compared as sets (near-equal scores may come out in either order):
    ``detections`` is the largest box-or-score difference between a detection and its closest
    counterpart of the same image and class, ``count`` the difference in number of detections.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    size = int(reference.model.input_size)
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()})]
    with torch.no_grad():
        expected = [t.cpu() for t in reference(images.to(reference.model.priors.device))]
    if len(got) == 2:
        return {
            name: (g.double() - e.double()).abs().max().item()
            for name, g, e in zip(("boxes", "scores"), got, expected, strict=True)
        }
    return {"count": float(abs(len(got[0]) - len(expected[0]))), "detections": _set_difference(got, expected)}


def _set_difference(got: list[Tensor], expected: list[Tensor]) -> float:
    """Largest distance from a detection to the closest one of the same image and class, both ways."""
    worst = 0.0
    keys = lambda dets: set(zip(dets[3].tolist(), dets[2].tolist(), strict=True))  # noqa: E731  (image, label)
    for image, label in keys(got) | keys(expected):
        a, b = (
            (torch.cat([d[0], d[1][:, None]], 1)[(d[3] == image) & (d[2] == label)]).double() for d in (got, expected)
        )
        if not len(a) or not len(b):
            return float("inf")
        cost = (a[:, None] - b[None]).abs().amax(-1)  # [Ka, Kb]
        worst = max(worst, cost.min(1).values.max().item(), cost.min(0).values.max().item())
    return worst
