"""The SSD paper's geometric augmentation (Sec. 2.2) as albumentations transforms: zoom-out onto a
mean-filled canvas (:class:`ZoomOut`) and the patch sampler (:func:`sample_patch`,
:class:`MinIoURandomCrop`), as torchvision's ``RandomIoUCrop`` and Caffe SSD implement it.

Boxes inside the transforms are albumentations' normalised ``xyxy`` arrays with the label columns
appended; the samplers themselves work in pixels (``xyxy``, continuous, 0-based edges).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

# The paper's options (Sec. 2.2): the whole image (None), a random patch (0.0), a patch with IoU >= 0.1 .. 0.9
PAPER_CROP_OPTIONS = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
MAX_OPTION_DRAWS = 50  # options drawn per image before the whole image is kept (torchvision: unbounded)


def _keep_positive(bboxes: np.ndarray) -> np.ndarray:
    """Rows of ``bboxes [N, 4+]`` whose box has positive width and height."""
    return bboxes[(bboxes[:, 2] > bboxes[:, 0]) & (bboxes[:, 3] > bboxes[:, 1])]


class ZoomOut(A.DualTransform):
    """Paste the image at a random place on a ``U(1, max_ratio)`` x larger canvas of colour ``fill``.

    ssd.pytorch ``Expand``: canvas ``int(h * r) x int(w * r)``, integer offsets, so boxes move by
    whole pixels. ``fill`` is an RGB colour in 0..255 (the dataset mean).
    """

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[float] = (124, 116, 104), p: float = 0.5):
        super().__init__(p=p)
        self.max_ratio = max_ratio
        self.fill = tuple(float(c) for c in fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_ratio)
        out_h, out_w = int(h * ratio), int(w * ratio)
        top = int(self.py_random.uniform(0, out_h - h))
        left = int(self.py_random.uniform(0, out_w - w))
        return {"paste": (top, left, out_h, out_w)}

    def apply(self, img: np.ndarray, paste: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        top, left, out_h, out_w = paste
        h, w = img.shape[:2]
        bottom, right = out_h - h - top, out_w - w - left
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=self.fill)

    def apply_to_bboxes(self, bboxes: np.ndarray, paste: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        top, left, out_h, out_w = paste
        h, w = params["shape"][:2]
        out = bboxes.astype(np.float64)  # [N, 4 + label columns], normalised to the input image
        out[:, [0, 2]] = (out[:, [0, 2]] * w + left) / out_w
        out[:, [1, 3]] = (out[:, [1, 3]] * h + top) / out_h
        return _keep_positive(out.astype(bboxes.dtype))


def box_iou_np(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``xyxy`` boxes, ``ndarray[T, 4] x ndarray[N, 4] -> ndarray[T, N]``.

    numpy twin of ``ssd.ops.boxes.box_iou``: the loader workers stay on numpy/cv2.
    """
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    return inter / np.maximum(area1[:, None] + area2[None, :] - inter, np.finfo(np.float64).tiny)


def centres_inside(boxes_px: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Whether each box centre lies strictly inside each crop (ssd.pytorch), ``[N, 4] x [T, 4] -> bool[T, N]``."""
    cx = (boxes_px[:, 0] + boxes_px[:, 2]) / 2
    cy = (boxes_px[:, 1] + boxes_px[:, 3]) / 2
    x1, y1, x2, y2 = (crops[:, i : i + 1] for i in range(4))
    return (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)


def sample_min_iou_crop(
    boxes_px: np.ndarray,
    image_hw: tuple[int, int],
    min_iou: float,
    scale: Sequence[float],
    aspect: Sequence[float],
    max_trials: int,
    rng: np.random.Generator,
) -> tuple[int, int, int, int] | None:
    """The first of ``max_trials`` random windows that satisfies the ``min_iou`` constraint, or None.

    A trial draws the window's width and height as ``int(U(scale) * side)`` independently (rejected
    unless ``aspect[0] <= w / h <= aspect[1]``) and its position as ``int(U(0, 1) * (side - w))``:
    whole-pixel ``xyxy`` windows, as torchvision's ``RandomIoUCrop``. A window passes when at least
    one box centre lies strictly inside it and the largest IoU of those boxes with the window is
    ``>= min_iou`` (torchvision; Caffe's ``SatisfySampleConstraint`` is "any box" too), so
    ``min_iou = 0`` is the paper's unconstrained random patch. All trials are drawn and checked at
    once (vectorised); the first passing one is returned, as a sequential loop would.
    """
    if not len(boxes_px):
        return None
    h, w = image_hw
    crop_w = (rng.uniform(scale[0], scale[1], max_trials) * w).astype(np.int64)
    crop_h = (rng.uniform(scale[0], scale[1], max_trials) * h).astype(np.int64)
    left = (rng.uniform(0.0, 1.0, max_trials) * (w - crop_w)).astype(np.int64)
    top = (rng.uniform(0.0, 1.0, max_trials) * (h - crop_h)).astype(np.int64)
    crops = np.stack([left, top, left + crop_w, top + crop_h], 1)  # [T, 4]
    ok = (crop_w > 0) & (crop_h > 0) & (crop_w >= aspect[0] * crop_h) & (crop_w <= aspect[1] * crop_h)
    inside = centres_inside(boxes_px, crops)  # [T, N]
    iou = np.where(inside, box_iou_np(crops.astype(np.float64), boxes_px), -1.0)  # [T, N]
    ok &= inside.any(1) & (iou.max(1) >= min_iou)
    if not ok.any():
        return None
    x1, y1, x2, y2 = (int(v) for v in crops[int(np.argmax(ok))])
    return x1, y1, x2, y2


def sample_patch(
    boxes_px: np.ndarray,
    image_hw: tuple[int, int],
    options: Sequence[float | None],
    scale: Sequence[float],
    aspect: Sequence[float],
    max_trials: int,
    rng: np.random.Generator,
    max_draws: int = MAX_OPTION_DRAWS,
) -> tuple[int, int, int, int] | None:
    """The SSD paper's patch sampling (Sec. 2.2): a window ``(x1, y1, x2, y2)``, or None for the whole image.

    Draws one of ``options`` uniformly: ``None`` keeps the whole image; a number ``m`` runs
    :func:`sample_min_iou_crop` with minimum IoU ``m`` (``0`` is the random patch). When all of an
    option's ``max_trials`` windows fail, a new option is drawn (torchvision's loop), at most
    ``max_draws`` times, so no image can hang a worker; then the whole image is kept. An image
    without boxes is never cropped: no window can keep a box, which is what every option but the
    whole image needs (torchvision and Caffe behave alike; images with objects are what a crop is for).
    """
    if not len(boxes_px):
        return None
    for _ in range(max_draws):
        min_iou = options[int(rng.integers(len(options)))]
        if min_iou is None:
            return None
        crop = sample_min_iou_crop(boxes_px, image_hw, min_iou, scale, aspect, max_trials, rng)
        if crop is not None:
            return crop
    return None


class MinIoURandomCrop(A.DualTransform):
    """The SSD paper's patch sampling as an albumentations transform (:func:`sample_patch`).

    ``min_ious``: the options, one drawn per image; ``None`` keeps the whole image, ``0.0`` is a random
    patch, ``m`` a patch with IoU >= ``m`` with some object (the paper and torchvision:
    ``None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9``). Boxes whose centre falls outside the window are dropped;
    the others are clipped to it.
    """

    def __init__(
        self,
        min_ious: Sequence[float | None] = PAPER_CROP_OPTIONS,
        scale: Sequence[float] = (0.3, 1.0),
        aspect: Sequence[float] = (0.5, 2.0),
        max_trials: int = 50,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.min_ious = list(min_ious)
        self.scale = tuple(scale)
        self.aspect = tuple(aspect)
        self.max_trials = max_trials

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        bboxes = data.get("bboxes")  # [N, 4 + label columns], normalised
        if bboxes is None or not len(bboxes):
            return {"crop": None}
        boxes_px = bboxes[:, :4].astype(np.float64) * (w, h, w, h)
        rng = self.random_generator
        return {"crop": sample_patch(boxes_px, (h, w), self.min_ious, self.scale, self.aspect, self.max_trials, rng)}

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int] | None, **params: Any) -> np.ndarray:
        if crop is None:
            return img
        x1, y1, x2, y2 = crop
        return img[y1:y2, x1:x2]

    def apply_to_bboxes(self, bboxes: np.ndarray, crop: tuple[int, int, int, int] | None, **params: Any) -> np.ndarray:
        if crop is None or not len(bboxes):
            return bboxes
        h, w = params["shape"][:2]
        out = bboxes.astype(np.float64)  # [N, 4 + label columns], normalised to the input image
        out[:, :4] *= (w, h, w, h)
        out = out[centres_inside(out[:, :4], np.array([crop]))[0]]
        x1, y1, x2, y2 = crop
        out[:, [0, 2]] = (np.clip(out[:, [0, 2]], x1, x2) - x1) / (x2 - x1)
        out[:, [1, 3]] = (np.clip(out[:, [1, 3]], y1, y2) - y1) / (y2 - y1)
        return _keep_positive(out.astype(bboxes.dtype))
