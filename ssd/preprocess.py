"""Images -> network input, the one definition shared by evaluation (:mod:`ssd.engine.evaluate`, the
training loop's evaluation and ``ssd eval``) and deployment (:mod:`ssd.inference`), so a checkpoint is
scored on exactly the inputs it will predict on. Neither of those imports the other.

The checkpoint's ``model.preprocess.resize`` decides the order of resizing and normalising:

- ``bilinear`` (checkpoints trained here, ssd.pytorch, lufficc): resize the uint8 image with OpenCV
  (``cv2.INTER_LINEAR``), then normalise on the device. An evaluation loader resizes in its workers
  (:func:`eval_transform`, ``A.Resize`` = the same ``cv2.resize``) and ships uint8 ``[B, 3, S, S]``.
- ``normalize_then_bilinear`` (converted torchvision weights): normalise the float image, then resize it
  with ``F.interpolate(mode="bilinear", align_corners=False)``, as torchvision's
  ``GeneralizedRCNNTransform`` does. An evaluation loader ships the original images
  (:func:`collate_originals`) and :func:`preprocess_images` resizes them on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssd.config import AugmentConfig, PreprocessConfig
from ssd.data.transforms import DetectionTransform, build_transforms, normalize_batch


def preprocess_images(
    images: Sequence[np.ndarray | Tensor], preprocess: PreprocessConfig, size: int, device: torch.device
) -> Tensor:
    """Images of any size -> the network input ``Tensor[B, 3, size, size]`` float32 on ``device``.

    ``images``: uint8 ``ndarray[H, W, 3]`` RGB or float ``Tensor[3, H, W]`` in [0, 1].
    ``bilinear``: OpenCV resize of the uint8 image (float images are rounded to uint8 first), stack,
    then :func:`normalize_batch` on ``device`` (NHWC in memory, ``channels_last``).
    ``normalize_then_bilinear``: per image, normalise in float32 on ``device`` and resize with
    ``F.interpolate`` (torchvision's order).
    """
    if preprocess.resize == "bilinear":
        resized = [cv2.resize(_hwc(im), (size, size), interpolation=cv2.INTER_LINEAR) for im in images]
        batch = torch.from_numpy(np.stack(resized)).to(device).permute(0, 3, 1, 2)  # [B, 3, S, S], NHWC in memory
        return normalize_batch(batch, preprocess)  # same values as collate() + normalize_batch in evaluation
    mean = torch.tensor(preprocess.mean, device=device).view(3, 1, 1)
    std = torch.tensor(preprocess.std, device=device).view(3, 1, 1)
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            x = torch.from_numpy(im).to(device).permute(2, 0, 1).float().mul_(preprocess.pixel_scale)
        else:
            x = im.to(device, torch.float32)
            unit = 255.0 * preprocess.pixel_scale  # [0, 1] input: 1.0 for torchvision's scale
            x = x * unit if unit != 1.0 else x
        if preprocess.channel_order == "bgr":
            x = x.flip(0)
        x = (x - mean) / std
        out.append(F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def _hwc(image: np.ndarray | Tensor) -> np.ndarray:
    """uint8 HWC arrays as they are; float [0, 1] CHW tensors rounded to uint8 HWC (the frame
    that evaluation and training saw: a float image made from a uint8 one predicts identically)."""
    if isinstance(image, np.ndarray):
        return image
    u8 = (image.detach().float().cpu() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return u8.permute(1, 2, 0).contiguous().numpy()


# --- evaluation loaders -----------------------------------------------------------------------------


def resizes_in_loader(preprocess: PreprocessConfig) -> bool:
    """Whether the loader resizes (uint8, ``bilinear``) or ships original images (``normalize_then_bilinear``)."""
    return preprocess.resize == "bilinear"


def eval_transform(aug: AugmentConfig, preprocess: PreprocessConfig, size: int) -> DetectionTransform | None:
    """The evaluation dataset's transform: the uint8 resize for ``bilinear``; none (original images) otherwise."""
    return build_transforms(aug, preprocess, size, train=False) if resizes_in_loader(preprocess) else None


def collate_originals(samples: list[dict]) -> dict:
    """Evaluation batches of images at their own sizes: ``images`` is a list of uint8 ``ndarray[H, W, 3]``
    (for :func:`preprocess_images`); ids, original sizes and the errors of unreadable samples as in
    :func:`ssd.data.dataset.collate`. No targets: evaluation reads them from the annotations."""
    good = [s for s in samples if "error" not in s]
    return {
        "images": [s["image"] for s in good],
        "image_ids": [s["image_id"] for s in good],
        "orig_sizes": [s["orig_size"] for s in good],
        "errors": [s["error"] for s in samples if "error" in s],
    }


def batch_input(batch: dict, preprocess: PreprocessConfig, size: int, device: torch.device) -> Tensor:
    """A loader batch -> the network input ``Tensor[B, 3, size, size]`` float32 on ``device``: uint8
    ``[B, 3, S, S]`` already resized are normalised on the device; a list of originals goes through
    :func:`preprocess_images`."""
    images = batch["images"]
    if not isinstance(images, Tensor):
        return preprocess_images(images, preprocess, size, device)
    if not resizes_in_loader(preprocess) or tuple(images.shape[-2:]) != (size, size):
        raise ValueError(
            f"a batch of {tuple(images.shape[-2:])} uint8 images for a {size} px model with resize "
            f"{preprocess.resize!r}: build the loader's dataset with eval_transform() and, for "
            "normalize_then_bilinear, collate_originals()"
        )
    return normalize_batch(images.to(device, non_blocking=True), preprocess)
