"""SSD data augmentation on albumentations (paper Sec. 2.2 "Data augmentation"; ssd.pytorch's recipe).

Conventions. Images stay ``uint8`` ``HxWx3`` RGB through the whole pipeline; the pipeline ends
with the resized uint8 image and normalisation happens later, on the model's device, on the
whole batch (:func:`normalize_batch`). Input boxes are ``xyxy`` pixels of the input image
(continuous, 0-based edges: a box covering pixel columns 0..9 is ``x1=0, x2=10``); output boxes
are ``xyxy`` normalised to [0, 1] of the output image. Inside the ``A.Compose`` boxes are
albumentations' own normalised ``xyxy`` arrays (label columns appended), handled by its
``BboxParams``; the custom transforms (here and in :mod:`ssd.data.geometry`) map them like any
albumentations transform.

Train pipeline (:func:`build_transforms` with ``train=True``; the geometric transforms live in
:mod:`ssd.data.geometry`), in order:
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

import functools
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from ssd.config import AugmentConfig, PreprocessConfig
from ssd.data.geometry import MinIoURandomCrop, ZoomOut

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

        contrast_low, contrast_high = self.contrast_range
        saturation_low, saturation_high = self.saturation_range
        return {
            "brightness": draw(-self.brightness_delta, self.brightness_delta, 0.0),
            "contrast_first": rand.random() < 0.5,
            "contrast": draw(contrast_low, contrast_high, 1.0),
            "saturation": draw(saturation_low, saturation_high, 1.0),
            "hue_deg": draw(-self.hue_delta, self.hue_delta, 0.0),
        }

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        names = ("brightness", "contrast", "contrast_first", "saturation", "hue_deg")
        return photometric_distort(img, *(params[k] for k in names))


# --- pipelines --------------------------------------------------------------------------------


def mean_fill_rgb(preprocess: PreprocessConfig) -> tuple[int, int, int]:
    """The dataset mean as an RGB uint8 colour: ``mean / pixel_scale``, un-swapped for ``bgr`` networks."""
    mean = [round(m / preprocess.pixel_scale) for m in preprocess.mean]
    mean = mean[::-1] if preprocess.channel_order == "bgr" else mean  # config mean is in network order
    r, g, b = (int(min(max(m, 0), 255)) for m in mean)
    return r, g, b


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
    Runs on the images' device (meant for the whole batch on the GPU, after the loader), keeps their
    memory format (NHWC batches from :func:`ssd.data.dataset.collate` stay NHWC), and takes ``mean``
    and ``std`` from a per-device cache: building them is a host-to-device copy, which must not
    happen in every training step.
    """
    if preprocess.channel_order == "bgr":
        images = images.flip(1)
    mean, std = _normalization_constants(tuple(preprocess.mean), tuple(preprocess.std), dtype, images.device)
    return images.to(dtype, copy=True).mul_(preprocess.pixel_scale).sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _normalization_constants(
    mean: tuple, std: tuple, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    return (
        torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1),
        torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1),
    )
