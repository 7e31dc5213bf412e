"""Inference: the :class:`Detector` Python API (``ssd predict`` runs it over files: :mod:`ssd.commands.predict`).

    from ssd import Detector
    det = Detector.from_checkpoint("model.pt", device="cpu")
    result = det("street.jpg")  # {"boxes" [N, 4] xyxy original pixels, "scores", "labels", "names"}

Preprocessing is the checkpoint's own (``config["model"]["preprocess"]``) and is defined once, in
:mod:`ssd.preprocess`, for ``ssd eval``, the training loop's evaluation and this module: ``bilinear``
(checkpoints trained here, ssd.pytorch, lufficc) resizes the uint8 image with OpenCV, then normalises;
``normalize_then_bilinear`` (converted torchvision weights) normalises, then resizes with
``F.interpolate``, so the detections equal torchvision's own model. Either way ``Detector`` on an
image gives what ``ssd eval`` scored for it.

Boxes come back in pixels of each original image (the post-processor rescales them per image).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
from ssd.config import PostprocessConfig, PreprocessConfig, from_dict
from ssd.data.dataset import read_image
from ssd.device import resolve_device
from ssd.fuse import fuse_batchnorm
from ssd.model import SSD
from ssd.onnx_model import check_onnx_options, is_onnx
from ssd.postprocess import PostProcessor, build_postprocess
from ssd.preprocess import preprocess_images
from ssd.weights import resolve_weights

log = logging.getLogger(__name__)


ImageInput = str | os.PathLike | np.ndarray | Tensor


# --- inputs -------------------------------------------------------------------------------------


def as_image(image: ImageInput, index: int = 0) -> np.ndarray | Tensor:
    """One input -> uint8 ``ndarray[H, W, 3]`` RGB, or float ``Tensor[3, H, W]`` in [0, 1].

    Accepts a file path (read upright: its EXIF orientation applied), a uint8 ``HxWx3`` RGB array, a
    uint8 ``3xHxW`` tensor (0..255) or a float ``3xHxW`` tensor in [0, 1] (torchvision's convention).
    ``index`` names the input in errors.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(str(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(
                f"image {index}: expected an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}"
            )
        return image
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or 0 in image.shape:
            raise ValueError(f"image {index}: expected a 3xHxW tensor, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.permute(1, 2, 0).cpu().numpy()
        if not image.is_floating_point():
            raise ValueError(f"image {index}: tensor dtype {image.dtype}; use uint8 (0..255) or float (0..1)")
        return image
    raise ValueError(f"image {index}: expected a path, a numpy array or a tensor, got {type(image).__name__}")


def image_size(image: np.ndarray | Tensor) -> tuple[int, int]:
    """``(h, w)`` of an image returned by :func:`as_image`."""
    h, w = image.shape[:2] if isinstance(image, np.ndarray) else image.shape[-2:]
    return h, w


# --- Detector -----------------------------------------------------------------------------------


class Detector:
    """A detector ready for inference: ``det(images)`` -> detections in original-image pixels.

    ``det(x)`` for one image (path, ``HxWx3`` uint8 RGB array, ``3xHxW`` tensor) returns one dict
    ``{"boxes": Tensor[N, 4] xyxy, "scores": Tensor[N], "labels": Tensor[N] int64 (1..C-1),
    "names": list[str]}`` on the CPU, sorted by decreasing score; a list (or a ``[B, 3, H, W]``
    tensor) returns a list of them. Inputs are run ``batch_size`` at a time under
    ``torch.inference_mode()``.
    """

    def __init__(
        self,
        model: SSD,
        classes: Sequence[str],
        preprocess: PreprocessConfig,
        postprocessor: PostProcessor,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        channels_last: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        # channels_last (NHWC) on the CPU: oneDNN convolutions skip their NCHW <-> blocked reorders, max
        # pooling runs its NHWC kernel (no argmax indices) and the heads' permute to [B, H*W*A, K] is a
        # view; SSD300 runs ~18% faster (bench row predict, docs/inference.md), same results to rounding.
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.classes = list(classes)
        self.preprocess = preprocess
        self.postprocessor = postprocessor
        self.batch_size = batch_size
        self.input_size = int(model.input_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "auto",
        fuse: bool = True,
        score_thresh: float = 0.3,
        batch_size: int = 8,
        channels_last: bool | None = None,
        weights_kind: str | None = None,
        threads: int | None = None,
    ) -> Detector:
        """Load a checkpoint (trained here or converted with ``ssd convert``) for inference; an exported
        ``.onnx`` goes to :meth:`from_onnx` (``threads``: its ONNX Runtime threads).

        ``device``: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N``. ``fuse`` folds every
        BatchNorm into its conv (:func:`ssd.fuse.fuse_batchnorm`). ``score_thresh``: detections
        scoring at most this are dropped (the other post-processing settings are the checkpoint's
        ``postprocess`` section if it has one, else the defaults of :class:`ssd.config.PostprocessConfig`:
        NMS 0.45, 200 per image). ``channels_last``: NHWC activations (default: on the CPU, where it
        is faster). ``weights_kind``: None for the checkpoint's default weights (the moving average of a
        run with ``train.ema``, the weights its logged mAP belongs to), ``"raw"`` or ``"ema"``
        (:func:`ssd.checkpoint.checkpoint_weights`).
        """
        if not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"score threshold must be in [0, 1), got {score_thresh}")
        path = resolve_weights(path)  # torchvision:NAME or a URL: the cached checkpoint
        if is_onnx(path):
            check_onnx_options(path, device, weights_kind)
            return cls.from_onnx(path, score_thresh, batch_size, threads)
        device = resolve_device(device) if isinstance(device, str) else device
        model, ckpt = model_from_checkpoint(path, weights_kind)
        model_cfg = checkpoint_model_config(ckpt, path)
        model.eval()
        if fuse:
            fuse_batchnorm(model)
        post_cfg = from_dict(PostprocessConfig, ckpt["config"].get("postprocess"), "postprocess")
        post_cfg.score_threshold = float(score_thresh)
        postprocessor = build_postprocess(post_cfg, model_cfg)
        return cls(model, ckpt["classes"], model_cfg.preprocess, postprocessor, device, batch_size, channels_last)

    @classmethod
    def from_onnx(
        cls, path: str | os.PathLike, score_thresh: float = 0.3, batch_size: int = 8, threads: int | None = None
    ) -> Detector:
        """An ``.onnx`` written by ``ssd export`` (fp32 or ``--int8``, with or without NMS in the graph), run by
        ONNX Runtime's CPU provider with ``threads`` (default: PyTorch's); its metadata gives the classes,
        preprocessing and post-processing, and decoding and NMS outside the graph are a checkpoint's."""
        from ssd.onnx_model import OnnxSSD, graph_preprocess

        net = OnnxSSD(path, threads)
        post_cfg = dataclasses.replace(net.postprocess, score_threshold=float(score_thresh))
        postprocessor = build_postprocess(post_cfg, net.model_cfg)
        preprocess = graph_preprocess(net.model_cfg.preprocess)  # the graph normalises its input itself
        return cls(net, net.classes, preprocess, postprocessor, "cpu", batch_size, channels_last=False)  # type: ignore[arg-type]

    def names(self, labels: Tensor) -> list[str]:
        return [self.classes[i - 1] if 0 < i <= len(self.classes) else str(i) for i in labels.tolist()]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray | Tensor]) -> list[dict[str, Any]]:
        """One forward pass over already-decoded images (see :func:`as_image`)."""
        if not images:
            return []
        sizes = [image_size(im) for im in images]
        x = preprocess_images(images, self.preprocess, self.input_size, self.device)
        # a no-op after the bilinear path (NHWC already); NCHW otherwise, evaluation's layout
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        out = self.model(x)
        dets = self.postprocessor(out, self.model.priors, (self.input_size, self.input_size), sizes)
        results = []
        for d in dets:
            result: dict[str, Any] = {k: v.cpu() for k, v in d.items()}
            result["names"] = self.names(result["labels"])
            results.append(result)
        return results

    def __call__(
        self, images: ImageInput | list[ImageInput] | tuple[ImageInput, ...]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        items: list[ImageInput]
        if isinstance(images, (list, tuple)) or (isinstance(images, Tensor) and images.ndim == 4):
            single, items = False, list(images)
        else:
            single, items = True, [images]
        results = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            results += self.predict_batch([as_image(im, start + i) for i, im in enumerate(chunk)])
        return results[0] if single else results


# --- ssd predict --------------------------------------------------------------------------------
