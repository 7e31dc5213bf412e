"""The ``augment`` bench row: JPEG decode + SSD training augmentation vs torchvision's transforms.v2 recipe."""

from __future__ import annotations

import statistics
import time

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from ssd.config import AugmentConfig, PreprocessConfig
from ssd.data.transforms import build_transforms, mean_fill_rgb


def synthetic_jpegs(count: int = 32, seed: int = 0) -> list[tuple[bytes, np.ndarray, np.ndarray]]:
    """``count`` 500x375 JPEGs (gradient, noise, filled boxes), 1..6 boxes each: (bytes, boxes_px, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    samples = []
    for _ in range(count):
        base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6), (xx + yy) * 0.2], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        n = int(rng.integers(1, 7))
        xy = rng.uniform(0, [400, 300], (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(15, 250, (n, 2)), [500, 375])], 1).astype(np.float32)
        for x1, y1, x2, y2 in boxes.astype(int):
            cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok, "JPEG encoding failed"
        samples.append((jpeg.tobytes(), boxes, rng.integers(1, 21, n)))
    return samples


def decode_rgb(jpeg: bytes) -> np.ndarray:
    """One of :func:`synthetic_jpegs`' JPEGs as an RGB uint8 array."""
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "JPEG decoding failed"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def bench_augment(repeats: int) -> dict:
    """JPEG decode + SSD train augmentation to 300x300 on one thread vs torchvision's transforms.v2 recipe.

    Per image over 32 synthetic 500x375 JPEGs. Ours: cv2.imdecode + ``build_transforms(train=True)``.
    Peer: decode_jpeg + RandomPhotometricDistort(p=1), RandomZoomOut(fill=mean), RandomIoUCrop,
    RandomHorizontalFlip, Resize((300, 300)). Repeats alternate the two sides (the CPU may be shared).
    The row also reports :func:`crop_statistics` (``crop``: fraction cropped and area kept, ours and
    torchvision's), printed as its note.
    """
    samples = synthetic_jpegs()
    ours_t = build_transforms(AugmentConfig(), PreprocessConfig(), 300, train=True, seed=0)
    peer_t = v2.Compose(
        [
            v2.RandomPhotometricDistort(p=1),
            v2.RandomZoomOut(fill=list(mean_fill_rgb(PreprocessConfig()))),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(),
            v2.Resize((300, 300)),
        ]
    )
    peer_in = [(torch.frombuffer(bytearray(b), dtype=torch.uint8), torch.from_numpy(bx)) for b, bx, _ in samples]
    ours_in = [(np.frombuffer(b, np.uint8), bx, lab) for b, bx, lab in samples]

    def ours():
        for jpeg, boxes, labels in ours_in:
            image = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            out = ours_t(image, boxes, labels)
        return out

    def peer():
        for jpeg, boxes in peer_in:
            image = tv_tensors.Image(decode_jpeg(jpeg))
            bbox = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
            out = peer_t(image, bbox)
        return out

    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        image, boxes, _ = ours()
        assert image.shape == (300, 300, 3) and image.dtype == np.uint8 and ((boxes >= 0) & (boxes <= 1)).all()
        assert tuple(peer()[0].shape) == (3, 300, 300)
        ours_s: list[float] = []
        peer_s: list[float] = []
        for _ in range(repeats):  # interleaved, so a busy neighbour slows both sides alike
            for fn, times in ((ours, ours_s), (peer, peer_s)):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) / len(samples))
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    crops = crop_statistics(voc_like_layouts())  # not timed: what the patch sampler does, side by side
    note = (
        "patch sampler alone on 2,000 VOC-like layouts: cropped {:.1%} vs torchvision {:.1%}, "
        "area kept {:.3f} vs {:.3f}"
    ).format(
        crops["ours"]["cropped"],
        crops["torchvision"]["cropped"],
        crops["ours"]["area_kept"],
        crops["torchvision"]["area_kept"],
    )
    return {
        "name": "augment",
        "ours_s": statistics.median(ours_s),
        "peer": "torchvision 0.29 transforms.v2 SSD recipe",
        "peer_s": statistics.median(peer_s),
        "target": 4.0,
        "crop": crops,
        "note": note,
    }


# --- the patch sampler's distribution, side by side with torchvision's RandomIoUCrop ---------------------

VOC_IMAGE_SHAPES = [(375, 500), (500, 375), (333, 500)]  # (h, w): the commonest VOC image shapes


def voc_like_layouts(
    count: int = 2000, seed: int = 0, scale: float = 0.25, expand_p: float = 0.5, expand_max_ratio: float = 4.0
) -> list[tuple[tuple[int, int], np.ndarray]]:
    """``count`` VOC-like layouts ``((canvas_h, canvas_w), boxes_px [N, 4] xyxy)``, fixed by ``seed``.

    A VOC image shape times ``scale`` (small canvases keep the measurement fast; the samplers work in
    fractions of the side), 1-6 objects whose sides are 5-60% of the image side, then the training's
    zoom-out (probability ``expand_p``, canvas ``U(1, expand_max_ratio)`` x larger, random position), so
    both samplers see the same zoomed-out canvases.
    """
    rng = np.random.default_rng(seed)
    layouts = []
    for _ in range(count):
        h, w = (round(s * scale) for s in VOC_IMAGE_SHAPES[rng.integers(len(VOC_IMAGE_SHAPES))])
        n = int(rng.integers(1, 7))
        size = rng.uniform(0.05, 0.6, (n, 2)) * (w, h)
        xy = rng.uniform(0.0, 1.0, (n, 2)) * ((w, h) - size)
        boxes = np.concatenate([xy, xy + size], 1)
        if rng.random() < expand_p:
            ratio = rng.uniform(1.0, expand_max_ratio)
            canvas_h, canvas_w = int(h * ratio), int(w * ratio)
            top, left = int(rng.uniform(0, canvas_h - h)), int(rng.uniform(0, canvas_w - w))
            boxes = boxes + (left, top, left, top)
            h, w = canvas_h, canvas_w
        layouts.append(((h, w), boxes.astype(np.float32)))
    return layouts


def _ramp(h: int, w: int) -> np.ndarray:
    """float32 ``[h, w, 3]``: channel 0 = x, channel 1 = y of each pixel centre (a crop's window is readable back)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return np.stack([xx, yy, np.zeros_like(xx)], -1)


def _window_fraction(image: np.ndarray, hw: tuple[int, int], size: int) -> float:
    """Fraction of the input area an output ``image [size, size, >=2]`` (crop resized, coordinates in
    channels 0/1) covers: bilinear resizing keeps a linear ramp linear, so its slope is window / size."""
    a, b = size // 4, 3 * size // 4
    window_w = (image[size // 2, b, 0] - image[size // 2, a, 0]) / (b - a) * size
    window_h = (image[b, size // 2, 1] - image[a, size // 2, 1]) / (b - a) * size
    return float(window_w * window_h / (hw[0] * hw[1]))


def _changed(before: np.ndarray, after: np.ndarray) -> bool:
    return before.shape != after.shape or not np.allclose(before, after, atol=1e-3)


def crop_statistics(layouts: list[tuple[tuple[int, int], np.ndarray]], trials: int = 50, size: int = 64) -> dict:
    """The patch sampler alone (every other op off) on ``layouts``: ours through ``build_transforms``
    and torchvision v2 ``RandomIoUCrop(trials=trials)``, each sample seeded by its index.

    Returns ``{"ours": {"cropped", "area_kept"}, "torchvision": {...}}``: the fraction of samples whose
    kept boxes' normalised coordinates changed, and the mean fraction of the canvas area the output shows.
    """
    aug = AugmentConfig(photometric_p=0.0, channel_swap_p=0.0, expand_p=0.0, flip_p=0.0, crop_max_trials=trials)
    ours_t = build_transforms(aug, PreprocessConfig(), size, train=True)
    peer_t = v2.Compose([v2.RandomIoUCrop(trials=trials), v2.SanitizeBoundingBoxes(labels_getter=None)])
    stats = {"ours": [0, 0.0], "torchvision": [0, 0.0]}
    for i, ((h, w), boxes) in enumerate(layouts):
        image = _ramp(h, w)
        normalised = boxes / np.array([w, h, w, h], np.float32)
        ours_t.set_seed(i)
        out_image, out_boxes, _ = ours_t(image, boxes, np.ones(len(boxes), np.int64))
        stats["ours"][0] += _changed(normalised, out_boxes)
        stats["ours"][1] += _window_fraction(out_image, (h, w), size)
        torch.manual_seed(i)
        bbox = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w))
        peer_image, peer_boxes = peer_t(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), bbox)
        ph, pw = peer_image.shape[-2:]
        stats["torchvision"][0] += _changed(normalised, peer_boxes.numpy() / np.array([pw, ph, pw, ph], np.float32))
        stats["torchvision"][1] += ph * pw / (h * w)
    n = len(layouts)
    return {k: {"cropped": c / n, "area_kept": a / n} for k, (c, a) in stats.items()}
