"""Detection datasets built from a :class:`DatasetConfig`: index, load images, apply transforms."""

from __future__ import annotations

import logging
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ssd.classes import VOC_CLASSES
from ssd.config import ConfigError, DatasetConfig
from ssd.data.coco import index_coco
from ssd.data.orientation import orientation_from_bytes, upright
from ssd.data.records import DatasetError, ImageRecord, Problems
from ssd.data.voc import index_voc
from ssd.data.yolo import index_yolo, yolo_classes
from ssd.ops.boxes import pad_targets

log = logging.getLogger(__name__)


def read_image(path: str, orientation: int | None = None) -> np.ndarray:
    """Decode an image file to RGB uint8 ``HxWx3``; raises ``DatasetError`` naming the file.

    ``orientation``: the EXIF orientation to apply (a dataset record's, see orientation.py); ``None``
    reads the file's own tag, so the pixels come upright. A JPEG without its end-of-image marker is
    reported as truncated: libjpeg only warns and returns a half-grey picture, which would otherwise
    train silently.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.size == 0:
        raise DatasetError(f"{path}: empty file")
    raw = data.tobytes()
    if raw[:2] == b"\xff\xd8":  # the end-of-image marker must follow the last start-of-scan (trailing data is fine)
        if raw.rfind(b"\xff\xd9") < max(2, raw.rfind(b"\xff\xda")):
            raise DatasetError(f"{path}: truncated JPEG (no end-of-image marker after the image data)")
    # stored pixels, turned below: OpenCV applies the tag for JPEG only, and a record may be read as stored
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DatasetError(f"{path}: not a decodable image")
    if orientation is None:
        orientation = orientation_from_bytes(raw)
    return upright(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), orientation)


def dataset_roots(cfg: DatasetConfig, key: str) -> list[tuple[str, str]]:
    """VOC / YOLO (root, split) pairs; one split applies to every root."""
    roots = [cfg.root] if isinstance(cfg.root, str) else list(cfg.root or [])
    splits = [cfg.split] * len(roots) if isinstance(cfg.split, str) else list(cfg.split)
    if not roots:
        raise ConfigError(f"{key}.root: a {cfg.format.upper()} dataset needs a root folder (or a list of them)")
    if len(splits) != len(roots):
        raise ConfigError(f"{key}.split: {len(splits)} splits for {len(roots)} roots; give one split or one per root")
    return list(zip(roots, splits, strict=True))


def index_dataset(cfg: DatasetConfig, problems: Problems, key: str = "data") -> tuple[list[ImageRecord], list[str]]:
    """Index the dataset a config describes. Returns ``(records, classes)``."""
    if cfg.format == "voc":
        classes = list(cfg.classes) if cfg.classes else list(VOC_CLASSES)
        records = []
        for root, split in dataset_roots(cfg, key):
            records += index_voc(root, split, classes, problems, ignore_other_classes=cfg.ignore_other_classes)
    elif cfg.format == "yolo":
        pairs = dataset_roots(cfg, key)
        classes = yolo_classes([root for root, _ in pairs], cfg.classes)
        records = []
        for root, split in pairs:
            records += index_yolo(root, split, classes, problems, cfg.ignore_other_classes)
    else:
        if not cfg.images or not cfg.annotations:
            raise ConfigError(f"{key}: a COCO dataset needs both 'images' (folder) and 'annotations' (JSON file)")
        records, classes = index_coco(cfg.images, cfg.annotations, cfg.classes, problems, cfg.ignore_other_classes)
    return records, classes


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class DetectionDataset(Dataset):
    """Images and boxes of indexed records, through ``transform``.

    A sample is ``{"image": uint8 [H, W, 3], "boxes": float32 [M, 4] (normalised xyxy after the
    transform), "labels": int64 [M], "image_id": str, "orig_size": (h, w)}``. With
    ``on_error="skip"`` an unreadable image yields ``{"error": message, "image_id": ...}``, which the
    collate function drops and counts; with ``"raise"`` it raises :class:`DatasetError`.
    ``train=True`` removes difficult / crowd objects (unless ``keep_difficult``).
    """

    def __init__(
        self,
        records: list[ImageRecord],
        classes: list[str],
        transform: Callable | None = None,
        train: bool = False,
        keep_difficult: bool = False,
        on_error: str = "raise",
    ) -> None:
        self.records = records
        self.classes = classes
        self.transform = transform
        self.train = train
        self.keep_difficult = keep_difficult
        self.on_error = on_error
        self.seed = 0  # set by build_dataloader

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        # EpochIndexSampler encodes epoch * n + index: augmentation is a function of (seed, epoch, index)
        epoch, index = divmod(index, len(self.records))
        rec = self.records[index]
        if self.train and self.transform is not None and hasattr(self.transform, "set_seed"):
            self.transform.set_seed(sample_seed(self.seed, epoch, index))
        try:
            image = read_image(rec.path, rec.orientation)
        except DatasetError as e:
            if self.on_error == "raise":
                raise
            return {"error": str(e), "image_id": rec.image_id}
        boxes, labels = rec.boxes, rec.labels
        if self.train and not self.keep_difficult:
            boxes, labels = boxes[~rec.difficult], labels[~rec.difficult]
        h, w = image.shape[:2]
        if (w, h) != (rec.width, rec.height):  # boxes were checked against the annotation's size
            turned = f" upright (EXIF orientation {rec.orientation})" if rec.orientation != 1 else ""
            message = f"{rec.path}: image is {w}x{h}{turned} but its annotation says {rec.width}x{rec.height}"
            if self.on_error == "raise":
                raise DatasetError(message)
            return {"error": message, "image_id": rec.image_id}
        if self.transform is not None:
            image, boxes, labels = self.transform(image, boxes, labels)
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": rec.image_id, "orig_size": (h, w)}


def build_dataset(
    cfg: DatasetConfig, transform: Callable | None, train: bool, on_error: str = "auto", key: str = "data.train"
) -> DetectionDataset:
    """Index (raising on problems unless ``on_error="skip"``) and wrap a dataset split."""
    problems = Problems("skip" if on_error == "skip" else "raise")
    records, classes = index_dataset(cfg, problems, key)
    problems.log_summary(key)
    if not cfg.keep_empty:
        before = len(records)
        records = [r for r in records if (~r.difficult).any()]
        if before != len(records):
            log.info("%s: dropped %d images without objects (keep_empty: false)", key, before - len(records))
    if not records:
        raise DatasetError(f"{key}: the dataset has no usable images")
    return DetectionDataset(
        records, classes, transform, train, cfg.keep_difficult, "raise" if on_error == "raise" else "skip"
    )


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 arrays of one size -> ``uint8 Tensor[B, 3, H, W]``, NHWC in memory
    (``channels_last``): one copy, no transpose; the network runs NHWC on the CPU and CUDA, and
    ``.contiguous()`` gives NCHW where it is wanted."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def collate(samples: list[dict]) -> dict:
    """Batch samples for the batched matcher: uint8 images ``[B, 3, S, S]``, padded boxes
    ``[B, G, 4]`` and labels ``[B, G]`` (label 0 = padding), ids, sizes, and the errors of
    skipped samples (counted by the caller)."""
    errors = [s["error"] for s in samples if "error" in s]
    good = [s for s in samples if "error" not in s]
    boxes, labels = pad_targets(
        [torch.as_tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4) for s in good],
        [torch.as_tensor(s["labels"], dtype=torch.int64) for s in good],
    )
    return {
        "images": stack_images([s["image"] for s in good]) if good else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
        "boxes": boxes,
        "labels": labels,
        "image_ids": [s["image_id"] for s in good],
        "orig_sizes": [s["orig_size"] for s in good],
        "errors": errors,
    }
