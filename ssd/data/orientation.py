"""EXIF orientation: one rule for every dataset format, ``ssd predict`` and the ``Detector``.

Cameras store pixels as the sensor read them and write an EXIF orientation tag (1-8) saying how to
turn them upright. The rule:

- pixels are brought to the upright (EXIF-corrected) frame for orientations 2-8, as image viewers,
  PIL's ``ImageOps.exif_transpose``, OpenCV's ``imread`` and Ultralytics do;
- YOLO labels are in that upright frame (Ultralytics and Roboflow write them there);
- a VOC / COCO annotation whose width x height matches the stored frame and not the upright one was
  drawn on the stored pixels (by a tool that ignores the tag): that image is read as stored;
- where the sizes cannot tell the two frames apart (orientations 2-4 keep the size, a square image,
  a VOC file without ``<size>``), the upright frame is used.

Each decision on a tagged image is counted with its file (:meth:`Problems.note`), so ``ssd data
check`` lists the rotated images and the undecidable ones.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssd.data.filecache import StatCache
from ssd.data.records import Problems

ORIENTATION_TAG = 0x0112
AS_STORED = 1

READ_UPRIGHT = "EXIF-rotated image, read upright"
READ_AS_STORED = "EXIF-rotated image annotated in its stored frame, read as stored"
UNDECIDABLE = "EXIF-rotated image whose annotation fits both frames, read upright"


@dataclass(frozen=True)
class ImageHeader:
    width: int  # the stored frame
    height: int
    orientation: int  # 1-8; 1 for a missing or invalid tag

    @property
    def upright_size(self) -> tuple[int, int]:
        """``(width, height)`` once turned upright: orientations 5-8 swap the axes."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def orientation_of(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, AS_STORED))
    except (ValueError, TypeError, SyntaxError, struct.error, OSError):  # a malformed EXIF block
        return AS_STORED
    return value if 1 <= value <= 8 else AS_STORED


def read_header(path: Path) -> ImageHeader:
    """Stored size and orientation from the file's header (no decoding); ``OSError`` if not an image."""
    with Image.open(path) as im:
        return ImageHeader(im.size[0], im.size[1], orientation_of(im))


def orientation_from_bytes(data: bytes) -> int:
    """The orientation tag of an encoded image in memory (1 where there is none or it cannot be read)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return orientation_of(im)
    except (OSError, ValueError, SyntaxError):
        return AS_STORED


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels ``[H, W, C]`` -> the upright frame, as ``PIL.ImageOps.exif_transpose`` turns them."""
    if orientation == AS_STORED:
        return image
    flip = orientation
    if orientation >= 5:  # 5 is the transpose; 6, 7, 8 flip it as 2, 3, 4 flip the stored image
        image, flip = image.transpose(1, 0, 2), orientation - 4
    if flip == 2:
        image = image[:, ::-1]
    elif flip == 3:
        image = image[::-1, ::-1]
    elif flip == 4:
        image = image[::-1]
    return np.ascontiguousarray(image)


def choose_frame(
    header: ImageHeader, annotated: tuple[int, int] | None, problems: Problems, where: str
) -> tuple[int, tuple[int, int]]:
    """The orientation to apply when decoding and the ``(width, height)`` the boxes are in, for an
    annotation of size ``annotated`` (``None``: unknown) on an image with ``header``."""
    stored = (header.width, header.height)
    if header.orientation == AS_STORED:
        return AS_STORED, annotated or stored
    up = header.upright_size
    if annotated is None or annotated == up == stored:
        problems.note(UNDECIDABLE, where)
        return header.orientation, up
    if annotated == up:
        problems.note(READ_UPRIGHT, where)
        return header.orientation, up
    if annotated == stored:
        problems.note(READ_AS_STORED, where)
        return AS_STORED, stored
    return header.orientation, annotated  # fits neither frame: decoding reports the size mismatch


class Headers:
    """Image headers by path, cached per folder (validated by each file's mtime and size)."""

    def __init__(self) -> None:
        self.caches: dict[Path, StatCache] = {}

    def __call__(self, path: str | Path) -> ImageHeader:
        path = Path(path)
        cache = self.caches.get(path.parent)
        if cache is None:
            cache = self.caches[path.parent] = StatCache("headers", path.parent, read_header)
        return cache.get(path)

    def save(self) -> None:
        for cache in self.caches.values():
            cache.save()
