"""SSD data augmentation on albumentations (paper Sec. 2.2 "Data augmentation"; ssd.pytorch's recipe).

Conventions. Images stay ``uint8`` ``HxWx3`` RGB through the whole pipeline; the pipeline ends
with the resized uint8 image and normalisation happens later, on the model's device, on the
whole batch (:func:`normalize_batch`). Input boxes are ``xyxy`` pixels of the input image
(continuous, 0-based edges: a box covering pixel columns 0..9 is ``x1=0, x2=10``); output boxes
are ``xyxy`` normalised to [0, 1] of the output image. Inside the ``A.Compose`` boxes are
albumentations' own normalised ``xyxy`` arrays (label columns appended), handled by its
``BboxParams``; the custom transforms below map them like any albumentations transform.

Train pipeline (:func:`build_transforms` with ``train=True``), in order:
``PhotometricDistort`` (+ ``A.ChannelShuffle``) on the small original image, ``ZoomOut`` onto a
mean-filled canvas, ``MinIoURandomCrop``, ``A.Resize`` (cv2 bilinear), ``A.HorizontalFlip``
(flipping after the resize equals flipping before it up to +-1 level on <1% of pixels, and
flips 300x300 px instead of crops of up to 2000x1500). Eval pipeline: ``A.Resize`` only.

Randomness: every transform draws from albumentations' generators (``self.py_random``,
``self.random_generator``: the documented way for a custom transform, which also gets its
data-dependent parameters from the documented ``get_params_dependent_on_data``).
:meth:`DetectionTransform.set_seed` gives all of them ONE shared, seeded pair of generators
(``Compose.set_random_state``: in the API reference, not in the guides, whose public seeding
``Compose(seed=k)`` is not used: it seeds each transform with the same ``k``, so e.g. the zoom-out
and flip coin flips of one image come out identical, perfectly correlated). With ``seed=None`` the
generators are seeded from OS entropy when built; forked DataLoader workers inherit that state, so reseed each worker
(``worker_init_fn``: ``set_seed(torch.initial_seed())``) or every worker augments alike.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

# albumentations 2.x asks PyPI for a newer version on import (up to 2 s, and a warning, on an offline
# machine): this framework never goes to the network at run time. A user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ssd.config import AugmentConfig, PreprocessConfig  # noqa: E402

# --- photometric ------------------------------------------------------------------------------


def _affine_lut(add: float, mul: float) -> np.ndarray:
    """uint8 lookup table of ``clip(round((x + add) * mul))``, ``ndarray[256]``."""
    return np.clip(np.rint((np.arange(256, dtype=np.float32) + add) * mul), 0, 255).astype(np.uint8)


def _adjust_hsv(img: np.ndarray, saturation: float, hue_deg: float) -> np.ndarray:
    """Scale saturation and rotate hue in one uint8 HSV round trip (``HSV_FULL``: hue 0..255 = 0..360 deg)."""
    h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL))
    if hue_deg != 0.0:
        shift = int(round(hue_deg * 256.0 / 360.0))
        h = cv2.LUT(h, ((np.arange(256) + shift) % 256).astype(np.uint8))
    if saturation != 1.0:
        s = cv2.LUT(s, _affine_lut(0.0, saturation))
    return cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2RGB_FULL)


def photometric_distort(
    img: np.ndarray, brightness: float, contrast: float, contrast_first: bool, saturation: float, hue_deg: float
) -> np.ndarray:
    """ssd.pytorch ``PhotometricDistort`` on uint8 RGB ``ndarray[H, W, 3]`` (identity values skip an op).

    ``x + brightness``, then ``x * contrast`` either before (``contrast_first``) or after the HSV
    saturation/hue ops. Brightness and a leading contrast fold into one ``cv2.LUT`` (no clipping
    between them, as in ssd.pytorch's float maths); values are clipped to 0..255 where uint8 needs
    it (ssd.pytorch never clips, so its saturation can leave the colour gamut).
    """
    hsv = saturation != 1.0 or hue_deg != 0.0
    lead_contrast = contrast if (contrast_first or not hsv) else 1.0
    if brightness != 0.0 or lead_contrast != 1.0:
        img = cv2.LUT(img, _affine_lut(brightness, lead_contrast))
    if hsv:
        img = _adjust_hsv(img, saturation, hue_deg)
        if not contrast_first and contrast != 1.0:
            img = cv2.LUT(img, _affine_lut(0.0, contrast))
    return img


class PhotometricDistort(A.ImageOnlyTransform):
    """Random brightness, contrast, saturation and hue, each applied with probability ``op_p``.

    Semantics of ssd.pytorch's ``PhotometricDistort`` (its channel swap is ``A.ChannelShuffle``):
    brightness ``+ U(-brightness_delta, brightness_delta)`` levels, contrast ``* U(contrast_range)``
    before or after (coin flip) saturation ``* U(saturation_range)`` and hue ``+ U(-hue_delta,
    hue_delta)`` degrees. uint8 in, uint8 out.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        op_p: float = 0.5,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta
        self.op_p = op_p

    def get_params(self) -> dict[str, Any]:
        rand = self.py_random

        def draw(low: float, high: float, identity: float) -> float:
            return rand.uniform(low, high) if rand.random() < self.op_p else identity

        return {
            "brightness": draw(-self.brightness_delta, self.brightness_delta, 0.0),
            "contrast_first": rand.random() < 0.5,
            "contrast": draw(*self.contrast_range, 1.0),
            "saturation": draw(*self.saturation_range, 1.0),
            "hue_deg": draw(-self.hue_delta, self.hue_delta, 0.0),
        }

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        names = ("brightness", "contrast", "contrast_first", "saturation", "hue_deg")
        return photometric_distort(img, *(params[k] for k in names))


# --- geometry -------------------------------------------------------------------------------

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
    return tuple(int(v) for v in crops[int(np.argmax(ok))])


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


# --- pipelines --------------------------------------------------------------------------------


def mean_fill_rgb(preprocess: PreprocessConfig) -> tuple[int, int, int]:
    """The dataset mean as an RGB uint8 colour: ``mean / pixel_scale``, un-swapped for ``bgr`` networks."""
    mean = [round(m / preprocess.pixel_scale) for m in preprocess.mean]
    mean = mean[::-1] if preprocess.channel_order == "bgr" else mean  # config mean is in network order
    return tuple(int(min(max(m, 0), 255)) for m in mean)


class DetectionTransform:
    """``t(image, boxes_px, labels) -> (image, boxes, labels)`` around an ``A.Compose``.

    In: ``image`` uint8 ``ndarray[H, W, 3]`` RGB, ``boxes_px`` float ``ndarray[N, 4]`` xyxy
    pixels, ``labels`` int ``ndarray[N]``. Out: uint8 ``ndarray[size, size, 3]``, float32
    ``ndarray[M, 4]`` xyxy normalised to [0, 1] of the output, int64 ``ndarray[M]`` (the labels
    of the M surviving boxes; boxes partly outside the input image are clipped to it, and boxes
    of zero area are dropped). The inputs are not modified.
    """

    def __init__(self, compose: A.Compose, size: int, seed: int | None = None):
        self.compose = compose
        self.size = size
        self.set_seed(seed)

    def set_seed(self, seed: int | None) -> None:
        """One shared (numpy, python) generator pair for every transform; None draws OS entropy."""
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        out = self.compose(image=image, bboxes=boxes, labels=labels)
        boxes_out = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4) / np.float32(self.size)
        labels_out = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        keep = (boxes_out[:, 2] > boxes_out[:, 0]) & (boxes_out[:, 3] > boxes_out[:, 1])
        return out["image"], np.clip(boxes_out[keep], 0.0, 1.0), labels_out[keep]


def build_transforms(
    aug: AugmentConfig, preprocess: PreprocessConfig, size: int, train: bool, seed: int | None = None
) -> DetectionTransform:
    """The SSD train (``train=True``) or eval (resize only) pipeline for a ``size`` x ``size`` input.

    ``seed`` seeds the pipeline (see :meth:`DetectionTransform.set_seed`; reseed per worker).
    """
    resize = A.Resize(size, size, interpolation=cv2.INTER_LINEAR)
    if not train:
        return DetectionTransform(A.Compose([resize], bbox_params=_bbox_params()), size, seed)
    transforms = [
        PhotometricDistort(
            aug.brightness_delta, aug.contrast_range, aug.saturation_range, aug.hue_delta, op_p=aug.photometric_p
        ),
        A.ChannelShuffle(p=aug.channel_swap_p),  # ssd.pytorch RandomLightingNoise: 6 perms incl. identity
        ZoomOut(aug.expand_max_ratio, mean_fill_rgb(preprocess), p=aug.expand_p),
        MinIoURandomCrop(aug.crop_min_ious, aug.crop_scale, aug.crop_aspect, aug.crop_max_trials),
        resize,
        A.HorizontalFlip(p=aug.flip_p),  # after the resize: cheaper, same result (module docstring)
    ]
    return DetectionTransform(A.Compose(transforms, bbox_params=_bbox_params()), size, seed)


def _bbox_params() -> A.BboxParams:
    # clip + filter_invalid_bboxes: input boxes poking out of the image are clipped, empty ones dropped.
    # No check after each transform (~1.1 ms of 5 per image): ours drop empty boxes themselves and
    # albumentations' flip/resize keep boxes valid; the final filter still runs.
    return A.BboxParams(
        format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True, check_each_transform=False
    )


# --- tensors ----------------------------------------------------------------------------------


def to_tensor(image: np.ndarray) -> Tensor:
    """uint8 ``ndarray[H, W, 3]`` -> uint8 ``Tensor[3, H, W]`` (one copy, for the transpose)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalize_batch(images: Tensor, preprocess: PreprocessConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 RGB ``Tensor[B, 3, H, W]`` -> network input ``(x * pixel_scale - mean) / std`` in ``dtype``.

    Channels are reversed first for ``channel_order: bgr`` (``mean``/``std`` are in network order).
    Runs on the images' device; meant for the whole batch on the GPU, after the loader.
    """
    if preprocess.channel_order == "bgr":
        images = images.flip(1)
    mean = torch.tensor(preprocess.mean, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    return images.to(dtype, copy=True).mul_(preprocess.pixel_scale).sub_(mean).div_(std)
