"""The ``loader`` bench row: the whole training input pipeline through a DataLoader, in images per second.

JPEG decode, SSD augmentation, resize to 300 and a uint8 batch, from a VOC-layout folder of JPEGs and
XMLs, with the same number of worker processes and the same batch size on both sides. Ours:
``build_dataset`` + ``build_transforms(train=True)`` + ``build_dataloader``. Peer: torchvision's detection
references (``references/detection``), SSD recipe: PIL decode (their ``CocoDetection`` opens images
with ``Image.open(path).convert("RGB")``; on this CPU their PIL path ran 43 ms per image against 59 ms
for ``decode_jpeg`` on tensors), the ``presets.py`` "ssd" augmentation on the PIL image, our
``Resize((300, 300))``, ``ToImage`` (uint8), ``SanitizeBoundingBoxes``, and a collate that stacks a
uint8 batch. Unlike the ``augment`` row (every photometric op, one core), this is the references'
recipe as they train with it: each photometric op with probability 0.5, like ours.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssd.bench.augment import synthetic_jpegs
from ssd.bench.timing import best_interleaved
from ssd.classes import VOC_CLASSES
from ssd.config import AugmentConfig, DatasetConfig, PreprocessConfig
from ssd.data.dataset import DetectionDataset, build_dataset
from ssd.data.loader import build_dataloader
from ssd.data.transforms import build_transforms, mean_fill_rgb

SIZE = 300


def voc_xml(boxes_px: np.ndarray, labels: np.ndarray, width: int = 500, height: int = 375) -> str:
    """A VOC annotation (1-based inclusive pixels: ``xmin = x1 + 1``, ``xmax = x2``) of VOC classes."""
    objects = "".join(
        f"<object><name>{VOC_CLASSES[int(label) - 1]}</name><difficult>0</difficult><bndbox>"
        f"<xmin>{round(x1) + 1}</xmin><ymin>{round(y1) + 1}</ymin><xmax>{round(x2)}</xmax><ymax>{round(y2)}</ymax>"
        f"</bndbox></object>"
        for (x1, y1, x2, y2), label in zip(boxes_px.tolist(), labels.tolist(), strict=True)
    )
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation>{size}{objects}</annotation>"


def write_voc_tree(root: Path, num_images: int, distinct: int = 64, seed: int = 0) -> Path:
    """A VOC folder of ``num_images`` 500x375 JPEGs and XMLs (split ``train``) made of ``distinct``
    :func:`synthetic_jpegs` under several names: decoding a copy costs the same, generating it does not."""
    samples = synthetic_jpegs(min(distinct, num_images), seed)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(num_images)]
    for i, image_id in enumerate(ids):
        jpeg, boxes, labels = samples[i % len(samples)]
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(boxes, labels))
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


# --- the two pipelines -----------------------------------------------------------------------------


def our_loader(root: Path, batch_size: int, num_workers: int) -> DataLoader:
    """Our training loader as ``train`` builds it, default augmentation, 300 px."""
    transform = build_transforms(AugmentConfig(), PreprocessConfig(), SIZE, train=True)
    dataset = build_dataset(DatasetConfig(root=str(root), split="train"), transform, train=True)
    return build_dataloader(dataset, batch_size, True, num_workers=num_workers)


def reference_transform() -> v2.Compose:
    """torchvision references' ``DetectionPresetTrain(data_augmentation="ssd")`` on PIL images, with
    the resize to 300 and a uint8 output (no ``ToDtype(float)``)."""
    return v2.Compose(
        [
            v2.RandomPhotometricDistort(),
            v2.RandomZoomOut(fill=list(mean_fill_rgb(PreprocessConfig()))),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.Resize((SIZE, SIZE)),
            v2.ToImage(),
            v2.SanitizeBoundingBoxes(),
            v2.ToPureTensor(),
        ]
    )


class ReferenceDetection(Dataset):
    """``(path, boxes_px [N, 4] xyxy, labels [N])`` items through ``transform``, decoded with PIL."""

    def __init__(self, items: list[tuple[str, np.ndarray, np.ndarray]], transform: Callable) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        path, boxes, labels = self.items[index]
        image = Image.open(path).convert("RGB")
        canvas = (image.height, image.width)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes), format="XYXY", canvas_size=canvas),
            "labels": torch.as_tensor(labels),
        }
        return self.transform(image, target)


def collate_uint8(samples: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """uint8 images ``[B, 3, 300, 300]`` and the targets as a list (boxes in pixels)."""
    images = torch.stack([image for image, _ in samples])
    return images, [target for _, target in samples]


def reference_loader(items: list, batch_size: int, num_workers: int) -> DataLoader:
    """The references' loader settings for training (shuffle, drop the last partial batch), workers
    kept between epochs as ours."""
    return DataLoader(
        ReferenceDetection(items, reference_transform()),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collate_uint8,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )


# --- checks ----------------------------------------------------------------------------------------


def check_boxes(boxes: torch.Tensor, where: str) -> None:
    """Normalised xyxy boxes inside [0, 1] with positive width and height."""
    assert ((boxes >= 0) & (boxes <= 1)).all(), f"{where}: boxes outside [0, 1]"
    assert (boxes[:, 2:] > boxes[:, :2]).all(), f"{where}: empty boxes"


def check_batch(images: torch.Tensor, batch_size: int | None, where: str) -> None:
    shape = (batch_size, 3, SIZE, SIZE)
    assert tuple(images.shape) == shape, f"{where}: images {tuple(images.shape)}, expected {shape}"
    assert images.dtype == torch.uint8, f"{where}: images are {images.dtype}, expected uint8"


def our_epoch(loader: DataLoader, check: bool = False) -> int:
    """Iterate one epoch; returns the number of images (checked batch by batch with ``check``)."""
    count = 0
    for batch in loader:
        if check:
            assert not batch["errors"], f"ours: unreadable images {batch['errors']}"
            check_batch(batch["images"], loader.batch_size, "ours")
            check_boxes(batch["boxes"][batch["labels"] > 0], "ours")
        count += len(batch["images"])
    return count


def reference_epoch(loader: DataLoader, check: bool = False) -> int:
    count = 0
    for images, targets in loader:
        if check:
            check_batch(images, loader.batch_size, "torchvision")
            for t in targets:
                check_boxes(t["boxes"] / SIZE, "torchvision")
        count += len(images)
    return count


# --- the row -----------------------------------------------------------------------------------------


def bench_loader(repeats: int, num_images: int = 256, batch_size: int = 32, num_workers: int = 2) -> dict:
    """Images/s of the training input pipeline, ``num_workers`` workers and batches of ``batch_size``
    on both sides, over epochs of ``num_images`` (64 distinct synthetic JPEGs). One checked epoch
    starts the (persistent) workers; then ``max(2, repeats)`` timed epochs alternate between the two
    loaders and the fastest of each counts. Per image, with images/s as extra numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_voc_tree(Path(tmp), num_images)
        ours = our_loader(root, batch_size, num_workers)
        # the peer reads the same files and boxes
        items = [(r.path, r.boxes, r.labels) for r in cast(DetectionDataset, ours.dataset).records]
        peer = reference_loader(items, batch_size, num_workers)
        counts = {"ours": our_epoch(ours, check=True), "peer": reference_epoch(peer, check=True)}
        expected = num_images // batch_size * batch_size
        assert counts == {"ours": expected, "peer": expected}, f"images per epoch {counts}, expected {expected}"
        pair = ours.collate_fn([ours.dataset[0], ours.dataset[1]])
        nhwc = pair["images"].is_contiguous(memory_format=torch.channels_last)
        epochs = {"ours": functools.partial(our_epoch, ours), "peer": functools.partial(reference_epoch, peer)}
        t = best_interleaved(epochs, max(2, repeats))
        # the last references: their persistent workers stop before the folder goes
        del ours, peer, epochs
    rate = {k: expected / v for k, v in t.items()}
    note = (
        f"{rate['ours']:.0f} vs {rate['peer']:.0f} images/s, {num_workers} workers, batches of {batch_size}, "
        f"epochs of {expected} 500x375 JPEGs; torchvision: PIL decode + transforms.v2 references SSD recipe"
    )
    return {
        "name": "loader",
        "ours_s": t["ours"] / expected,
        "peer": "torchvision 0.29 references loader (PIL + transforms.v2)",
        "peer_s": t["peer"] / expected,
        "target": 4.0,
        "ours_images_per_s": rate["ours"],
        "peer_images_per_s": rate["peer"],
        "images_per_epoch": expected,
        "batch": batch_size,
        "num_workers": num_workers,
        "ours_batch_nhwc": nhwc,
        "note": note,
    }
