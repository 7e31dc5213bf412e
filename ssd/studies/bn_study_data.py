"""The BN study's data: the shapes set generated when absent, the validation subset every variant is
scored on, and the fixed batch of training images the activation histograms are measured on."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from torch import Tensor

from ssd.config import Config, DatasetConfig
from ssd.data.dataset import build_dataset, dataset_roots, stack_images
from ssd.data.shapes import SHAPES_CLASSES, ensure_shapes
from ssd.data.transforms import build_transforms
from ssd.data.voc import read_split
from ssd.data.yolo import subset_lists
from ssd.demo import DEMO_DATA

log = logging.getLogger("ssd.bn_study")

STUDY_DATA = dict(DEMO_DATA)  # generated when the config's data root is absent: the demo's shapes set


def ensure_study_data(cfg: Config) -> None:
    """Generate the shapes dataset at the config's data root when that root does not exist yet (as
    ``ssd demo`` does); any other missing dataset is an error naming the key."""
    ds = cfg.data.train
    if ds.format != "voc":
        return
    roots = dataset_roots(ds, "data.train")
    missing = [root for root, _ in roots if not Path(root).exists()]
    if not missing:
        return
    if len(roots) != 1 or list(ds.classes or []) != SHAPES_CLASSES:
        raise FileNotFoundError(
            f"data.train.root {missing[0]}: not found (only the synthetic shapes dataset is generated "
            "when absent; point data.train at your data)"
        )
    log.info("data.train.root %s is absent: generating the shapes dataset there (%s)", missing[0], STUDY_DATA)
    ensure_shapes(missing[0], **STUDY_DATA)


def val_subset(ds: DatasetConfig, num_images: int, out: Path) -> DatasetConfig:
    """``ds`` restricted to its first ``num_images`` images (0: all), without touching the data folder.

    VOC: a view folder per root under ``out`` with symlinked ``Annotations``/``JPEGImages`` and a
    shortened split file; COCO: a JSON with the first images of the file and their annotations;
    YOLO: a list file per root.
    """
    if num_images <= 0:
        return ds
    if ds.format == "coco":
        if not ds.annotations or not Path(ds.annotations).is_file():
            raise FileNotFoundError(f"data.val.annotations {ds.annotations}: COCO annotation file not found")
        data = json.loads(Path(ds.annotations).read_text())
        images = data.get("images", [])[:num_images]
        keep = {im["id"] for im in images}
        subset = dict(
            data, images=images, annotations=[a for a in data.get("annotations", []) if a["image_id"] in keep]
        )
        out.mkdir(parents=True, exist_ok=True)
        path = out / "instances_val_subset.json"
        path.write_text(json.dumps(subset))
        return dataclasses.replace(ds, annotations=str(path))
    if ds.format == "yolo":
        roots, splits = subset_lists(dataset_roots(ds, "data.val"), num_images, out)
        return dataclasses.replace(ds, root=roots, split=splits)
    roots, splits, left = [], [], num_images
    for i, (root_arg, split) in enumerate(dataset_roots(ds, "data.val")):
        if left <= 0:
            break
        root = Path(root_arg).resolve()
        ids = read_split(root, split)[:left]
        left -= len(ids)
        view = out / f"view{i}"
        (view / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for folder in ("Annotations", "JPEGImages"):
            link = view / folder
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(root / folder, target_is_directory=True)
        (view / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        roots.append(str(view))
        splits.append(split)
    return dataclasses.replace(ds, root=roots, split=splits)


def fixed_batch(cfg: Config, num_images: int) -> Tensor:
    """The first ``num_images`` training images, resized only (no augmentation): uint8 ``[N, 3, S, S]``."""
    assert cfg.model.input_size is not None  # set by ModelConfig.__post_init__
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size, train=False)
    dataset = build_dataset(cfg.data.train, transform, train=False, on_error="raise", key="data.train")
    n = min(num_images, len(dataset))
    if n < 2:
        raise ValueError(
            f"data.train has {len(dataset)} image(s); the activation histograms need at least 2 (BN batch statistics)"
        )
    return stack_images([dataset[i]["image"] for i in range(n)])
