"""YOLO layout: image folders and ``labels`` folders with one ``class cx cy w h`` line per object.

A split (``root`` + ``split`` in the config) is found in this order:

1. ``data.yaml`` (or ``data.yml``) in the root with the key ``<split>`` (Ultralytics' ``train``, ``val``,
   ``test``): a path or a list of paths relative to the root, each an image folder or a list file. The
   file's ``path`` key is ignored (the config's ``root`` is the base); a ``../x`` that leads nowhere is
   read as ``x`` (Roboflow exports write ``train: ../train/images`` next to ``train/``).
2. ``images/<split>/`` (labels in ``labels/<split>/``).
3. ``<split>/images/`` (labels in ``<split>/labels/``).
4. ``<split>`` or ``<split>.txt``, a list file or an image folder, relative to the root or absolute.

An image's label file is its path with the last ``images`` folder replaced by ``labels`` and the
extension by ``.txt`` (Ultralytics' rule, which covers both folder arrangements); an image without
one has no objects. A list file holds one image path per line, relative to the list file's folder
or absolute. Image folders are searched recursively for ``IMAGE_EXTENSIONS`` (any case), sorted.
Image ids are the image paths relative to the root, without extension.

Class names: the config's ``classes``, else ``data.yaml`` ``names`` (a list, or an id -> name map
with ids 0..K-1), else ``classes.txt`` (one name per line); class id k is label k + 1.

A line ``class cx cy w h`` (normalised to the image's width W and height H) becomes the continuous
pixel box ``((cx - w/2) W, (cy - h/2) H, (cx + w/2) W, (cy + h/2) H)`` (see records.py);
``source_boxes`` hold it in VOC's numbers (``x1 + 1, y1 + 1, x2, y2``), the frame evaluation uses
for data without a COCO file (evalset.py), where the devkit's +1 makes the IoU exactly continuous.

Bad input, under the ``raise`` / ``skip`` policy of :class:`~ssd.data.records.Problems`: a line that
is not five numbers or whose class is not an integer ("malformed label line"), a class id outside
the class list ("class id out of range"; with ``ignore_other_classes`` ids beyond the list are
dropped and counted), a box corner more than ``BORDER_TOLERANCE`` outside [0, 1] ("box outside the
image"). Always repaired and counted: corners within the tolerance are clipped; a polygon
(segmentation) line ``class x1 y1 x2 y2 x3 y3 ...`` becomes the bounding box of its points ("polygon
converted to box"), line by line. Labels are in the EXIF-upright frame (orientation.py), as
Ultralytics and Roboflow write them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import yaml

from ssd.classes import unlisted_kind
from ssd.data.orientation import AS_STORED, READ_UPRIGHT, Headers
from ssd.data.records import DatasetError, ImageRecord, Problems, sanitize_boxes
from ssd.data.voc import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# how far (a fraction of the image side) a corner may lie outside [0, 1] and still be clipped: exports
# round cx and w separately, which puts edge boxes a few 1e-4 out; 1% is 6 px of a 640 px image
BORDER_TOLERANCE = 0.01
DATA_YAML = ("data.yaml", "data.yml")


def read_data_yaml(root: Path) -> tuple[Path | None, dict]:
    """``(path, content)`` of the root's ``data.yaml``, or ``(None, {})`` when there is none."""
    for name in DATA_YAML:
        path = root / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise DatasetError(f"{path}: malformed YAML ({e})") from None
            if not isinstance(data, (dict, type(None))):
                raise DatasetError(f"{path}: expected a mapping with names, train, val, got a {type(data).__name__}")
            return path, data or {}
    return None, {}


def _names_from_yaml(path: Path, data: dict) -> list[str]:
    names = data["names"]
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(
                f"{path}: names: the keys of an id -> name map must be integers, got {list(names)[:5]}"
            ) from None
        if sorted(by_id) != list(range(len(by_id))):
            missing = sorted(set(range(max(by_id, default=-1) + 1)) - set(by_id))
            raise DatasetError(
                f"{path}: names: ids must be 0..{len(by_id) - 1} without gaps; missing {missing[:10] or 'none'} "
                f"(ids {sorted(by_id)[:10]})"
            )
        names = [by_id[i] for i in range(len(by_id))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: names must be a non-empty list or an id -> name map, got {names!r:.80}")
    names = [str(n) for n in names]
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{path}: nc is {data['nc']} but names has {len(names)} entries")
    return names


def yolo_class_names(root: str | os.PathLike) -> list[str] | None:
    """The class names a YOLO root declares: ``data.yaml`` ``names``, else ``classes.txt``, else None."""
    root = Path(root)
    path, data = read_data_yaml(root)
    if "names" in data:
        assert path is not None  # data is empty without a data.yaml
        return _names_from_yaml(path, data)
    txt = root / "classes.txt"
    if not txt.is_file():
        return None
    lines = txt.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise DatasetError(f"{txt}:{i}: empty class name (one name per line; class id k is line k + 1)")
    if not lines:
        raise DatasetError(f"{txt}: no class names (one name per line)")
    return [line.strip() for line in lines]


def yolo_classes(roots: list[str], classes: list[str] | None) -> list[str]:
    """The class list of YOLO roots: ``classes`` when given, else the names every root declares (the same)."""
    declared = {root: yolo_class_names(root) for root in roots}
    if classes:
        for root, names in declared.items():
            if names is not None and names[: len(classes)] != list(classes):
                log.warning(
                    "%s: the config's classes %s differ from the names the dataset declares %s; "
                    "class id k is the config's classes[k]",
                    root,
                    list(classes)[:5],
                    names[:5],
                )
        return list(classes)
    first, names = roots[0], declared[roots[0]]
    if names is None:
        raise DatasetError(
            f"{first}: no class names: set classes in the dataset config, or put data.yaml (names) or "
            "classes.txt (one name per line) in the root"
        )
    for root, other in declared.items():
        if other != names:
            raise DatasetError(
                f"{root}: declares classes {(other or [])[:5]}, {first} declares {names[:5]}; "
                "concatenated roots need the same classes (or set classes in the config)"
            )
    return names


# --- where the images of a split are ------------------------------------------------------------


def _yaml_source(root: Path, value: str, yaml_path: Path, key: str) -> Path:
    path = root / value
    if not path.exists() and value.startswith("../") and (root / value[3:]).exists():
        path = root / value[3:]  # Roboflow: "../train/images" next to data.yaml means "train/images"
    if not path.exists():
        raise FileNotFoundError(f"{yaml_path}: {key}: {path} not found")
    return path


def available_splits(root: Path, data: dict) -> list[str]:
    found = [k for k in ("train", "val", "valid", "test") if k in data]
    if (root / "images").is_dir():
        found += [p.name for p in sorted((root / "images").iterdir()) if p.is_dir()]
    found += [p.name for p in sorted(root.iterdir()) if (p / "images").is_dir()]
    found += [p.name for p in sorted(root.glob("*.txt")) if p.name != "classes.txt"]
    return list(dict.fromkeys(found))


def split_sources(root: Path, split: str) -> list[Path]:
    """The image folders and list files of ``split`` (the order in the module docstring)."""
    yaml_path, data = read_data_yaml(root)
    if split in data:
        value = data[split]
        assert yaml_path is not None  # data is empty without a data.yaml
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise DatasetError(f"{yaml_path}: {split}: expected a path or a list of paths, got {value!r:.80}")
        return [_yaml_source(root, v, yaml_path, split) for v in values]
    for folder in (root / "images" / split, root / split / "images"):
        if folder.is_dir():
            return [folder]
    for path in (root / split, root / f"{split}.txt"):
        if path.exists():
            return [path]
    tried = ([f"{yaml_path.name} key {split!r}"] if yaml_path else []) + [
        f"images/{split}/",
        f"{split}/images/",
        f"{split}.txt",
    ]
    available = available_splits(root, data)
    raise FileNotFoundError(
        f"{root}: YOLO split {split!r} not found (looked for {', '.join(tried)})"
        + (f"; available: {', '.join(available[:10])}" if available else "")
    )


def list_images(source: Path) -> list[Path]:
    """The images of a folder (recursive, sorted) or of a list file (its order; relative to its folder)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    images = []
    for line in source.read_text().splitlines():
        if line.strip():
            path = Path(line.strip())
            images.append(path if path.is_absolute() else source.parent / path)
    return images


def label_path(image: Path) -> Path:
    """``.../images/.../x.jpg`` -> ``.../labels/.../x.txt`` (the last ``images`` folder);
    else ``x.txt`` beside the image."""
    parts = list(image.parts)
    folders = parts[:-1]
    if "images" in folders:
        folders[len(folders) - 1 - folders[::-1].index("images")] = "labels"
    return Path(*folders, parts[-1]).with_suffix(".txt")


def subset_lists(pairs: list[tuple[str, str]], num_images: int, out: Path) -> tuple[list[str], list[str]]:
    """``(roots, splits)`` for the first ``num_images`` images of YOLO (root, split) pairs: a list file per
    root under ``out``, absolute paths under the resolved root (so the image ids stay the same)."""
    roots, splits, left = [], [], num_images
    for i, (root_arg, split) in enumerate(pairs):
        if left <= 0:
            break
        root = Path(root_arg).resolve()
        images = [image for source in split_sources(root, split) for image in list_images(source)][:left]
        left -= len(images)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"yolo{i}.txt").write_text("".join(f"{image}\n" for image in images))
        roots.append(str(root))
        splits.append(str(out / f"yolo{i}.txt"))
    return roots, splits


# --- label files --------------------------------------------------------------------------------


def parse_label_file(
    path: Path, classes: list[str], problems: Problems, ignore_other_classes: bool = False
) -> tuple[list[int], list[tuple[float, float, float, float]]]:
    """``(class ids, normalised (x1, y1, x2, y2) corners)`` of the usable lines of one label file."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.report("unreadable label file", str(path), f"cannot read ({e})")
        return [], []
    ids, corners = [], []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            parsed = parse_label_line(line.strip(), f"{path}:{lineno}", classes, problems, ignore_other_classes)
            if parsed is not None:
                ids.append(parsed[0])
                corners.append(parsed[1])
    return ids, corners


def parse_label_line(
    line: str, where: str, classes: list[str], problems: Problems, ignore_other_classes: bool
) -> tuple[int, tuple[float, float, float, float]] | None:
    """``(class id, normalised corners)`` of one ``class cx cy w h`` line,
    or None (reported or counted at ``where``)."""
    try:
        values = [float(t) for t in line.split()]
    except ValueError:
        problems.report("malformed label line", where, f"{line!r:.80} is not numbers; expected 'class cx cy w h'")
        return None
    polygon = len(values) >= 7 and len(values) % 2 == 1  # class x1 y1 x2 y2 x3 y3 ...: a segmentation outline
    if len(values) != 5 and not polygon:
        problems.report(
            "malformed label line",
            where,
            f"{len(values)} values in {line!r:.80}; expected 5: class cx cy w h (normalised to [0, 1])",
        )
        return None
    if not values[0].is_integer():
        problems.report("malformed label line", where, f"class id {line.split()[0]!r} is not an integer")
        return None
    class_id = int(values[0])
    if not 0 <= class_id < len(classes):
        if ignore_other_classes and class_id >= len(classes):
            problems.fix(unlisted_kind(class_id), where)
        else:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            problems.report(
                "class id out of range",
                where,
                f"class id {class_id} is not in 0..{len(classes) - 1} ({len(classes)} classes: {shown})",
            )
        return None
    if polygon:  # its points' bounding box, line by line (a file may mix boxes and outlines)
        xs, ys = values[1::2], values[2::2]
        box = (min(xs), min(ys), max(xs), max(ys))
        problems.fix("polygon converted to box", where)
        given = f"polygon of {len(xs)} points"
    else:
        cx, cy, w, h = values[1:]
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        given = f"box (cx, cy, w, h) = {tuple(values[1:])}"
    if all(map(math.isfinite, box)) and (min(box) < -BORDER_TOLERANCE or max(box) > 1 + BORDER_TOLERANCE):
        problems.report(
            "box outside the image",
            where,
            f"{given} reaches "
            f"({box[0]:.4g}, {box[1]:.4g}, {box[2]:.4g}, {box[3]:.4g}) (x1, y1, x2, y2), more than "
            f"{BORDER_TOLERANCE} outside [0, 1]",
        )
        return None
    return class_id, box


def _image_id(image: Path, root: Path) -> str:
    try:
        return image.relative_to(root).with_suffix("").as_posix()
    except ValueError:  # a list file's absolute path outside the root
        return image.with_suffix("").as_posix()


def index_yolo(
    root: str | os.PathLike, split: str, classes: list[str], problems: Problems, ignore_other_classes: bool = False
) -> list[ImageRecord]:
    """Index one YOLO (root, split). Labels are class id + 1 (1-based positions in ``classes``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: YOLO root folder not found (expected images/ and labels/ folders, or data.yaml)"
        )
    images = [image for source in split_sources(root, split) for image in list_images(source)]
    records, labelled = [], 0
    owner: dict[Path, Path] = {}
    headers = Headers()
    for image in images:
        labels_file = label_path(image)
        if labels_file in owner:
            problems.report(
                "duplicate image", str(image), f"shares its label file {labels_file} with {owner[labels_file]}"
            )
            continue
        owner[labels_file] = image
        if not image.is_file():
            problems.report("missing image", str(image), f"image file not found (split {split!r} of {root})")
            continue
        try:
            header = headers(image)
        except OSError as e:
            problems.report("unreadable image", str(image), f"cannot read the image header ({e})")
            continue
        width, height = header.upright_size
        if header.orientation != AS_STORED:
            problems.note(READ_UPRIGHT, str(image))
        ids: list[int] = []
        corners: list[tuple[float, float, float, float]] = []
        if labels_file.is_file():
            labelled += 1
            ids, corners = parse_label_file(labels_file, classes, problems, ignore_other_classes)
        pixel = np.asarray(corners, np.float64).reshape(-1, 4) * np.array([width, height, width, height], np.float64)
        boxes, keep = sanitize_boxes(pixel.astype(np.float32), width, height, problems, str(labels_file))
        source = boxes[keep].astype(np.float64) + np.array([1.0, 1.0, 0.0, 0.0])  # VOC's numbers (module docstring)
        records.append(
            ImageRecord(
                image_id=_image_id(image, root),
                path=str(image),
                width=width,
                height=height,
                boxes=boxes[keep],
                labels=np.asarray(ids, np.int64)[keep] + 1,
                difficult=np.zeros(int(keep.sum()), bool),
                source_boxes=source,
                orientation=header.orientation,
            )
        )
    headers.save()
    if images and not labelled:
        log.warning(
            "%s split %r: none of the %d images has a label file (e.g. %s); they have no objects",
            root,
            split,
            len(images),
            label_path(images[0]),
        )
    return records
