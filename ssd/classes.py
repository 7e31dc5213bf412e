"""Class-name lists of the public datasets (index 0 is always the background), and matching two lists by name."""

from __future__ import annotations

import difflib

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

# The 80 COCO categories in id order (ids 1..90 with gaps; see COCO_91_NAMES for the padded list)
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]  # fmt: skip


def coco_91_names() -> list[str]:
    """torchvision's 91-entry label space (index = COCO category id, unused ids named ``N/A``), minus background."""
    names = ["N/A"] * 91
    for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True):
        names[cid] = name
    return names[1:]


def class_key(name: str) -> str:
    """The form names are compared in: case-insensitive, surrounding whitespace ignored."""
    return name.strip().casefold()


def match_classes(model_classes: list[str], data_classes: list[str]) -> tuple[dict[int, int], str]:
    """How a model's labels map onto a dataset's: ``({model label: data label}, "position" | "name")``, labels 1-based.

    By position when both lists have the same length and every name found in both sits at the same
    index (equal lists; classes renamed in place; no name in common), else by name (:func:`class_key`).
    A model label missing from the mapping has no class in the data. Raises ``ValueError`` when a
    matched name is ambiguous (twice in one list) or the lengths differ and no name is in both.
    """
    model_keys = [class_key(n) for n in model_classes]
    data_keys = [class_key(n) for n in data_classes]
    shared = set(model_keys) & set(data_keys)
    if len(model_keys) == len(data_keys) and all(
        m == d for m, d in zip(model_keys, data_keys, strict=True) if m in shared or d in shared
    ):
        return {label: label for label in range(1, len(model_keys) + 1)}, "position"
    if not shared:
        raise ValueError(f"no class name is in both lists ({len(model_keys)} vs {len(data_keys)} classes)")
    for keys, side in ((model_keys, "model"), (data_keys, "data")):
        twice = sorted(k for k in shared if keys.count(k) > 1)
        if twice:
            raise ValueError(
                f"class name(s) {', '.join(map(repr, twice))} appear twice in the {side} classes; cannot match by name"
            )
    data_label = {key: label for label, key in enumerate(data_keys, 1)}
    return {label: data_label[key] for label, key in enumerate(model_keys, 1) if key in data_label}, "name"


def unlisted_class_hint(name: str, classes: list[str], skip_hint: bool = True) -> str:
    """The tail of an "object class X is not in classes" error: the closest listed name, and the two
    ways on (``ignore_other_classes`` drops such objects, ``data.on_error=skip`` skips them as problems)."""
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.6)
    if not close:  # case and surrounding spaces are not a spelling difference
        close = [c for c in classes if class_key(c) == class_key(name)][:1]
    text = f" (did you mean {close[0]!r}?)" if close else ""
    text += (
        "; to train on the listed classes only, set ignore_other_classes: true on this dataset "
        "(e.g. data.train.ignore_other_classes=true)"
    )
    return text + (", or data.on_error=skip to skip such objects as counted problems" if skip_hint else "")


def unlisted_kind(name: str | int) -> str:
    """The repair kind (``Problems.fix``) of an object dropped because its class is not in ``classes``
    (``ignore_other_classes``): one kind per class, so the check and the build log count them per class
    (YOLO: per class id)."""
    what = f"id {name}" if isinstance(name, int) else repr(name)
    return f"object of unlisted class {what} dropped (ignore_other_classes)"
