"""The ``data`` section: dataset splits, the training augmentation, loader settings.

Every default of the section lives in these dataclasses; ``__post_init__`` checks values and names
the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssd.config.io import ConfigError, check_choice

DATA_FORMATS = ("voc", "coco", "yolo")
ON_ERROR = ("auto", "raise", "skip")


@dataclass
class DatasetConfig:
    """One dataset split.

    Relative ``root``, ``images`` and ``annotations`` (and ``model.init`` paths) are resolved against the
    working directory, not the config file's folder: an override ``data.train.root=...`` then means what
    the shell means, the shipped configs' ``data/...`` work from the repository root, and a run's saved
    ``config.yaml`` works from where the run started. Paths inside a dataset follow its own rules.
    """

    format: str = "voc"  # voc | coco | yolo
    # VOC: a VOCdevkit-style folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``);
    # several roots with one split each concatenate (VOC07+12): ``root: [VOC2007, VOC2012]``,
    # ``split: [trainval, trainval]``. YOLO: a dataset folder, as VOC's. Unused by COCO.
    root: list[str] | str | None = None
    # one per root, or one for all roots. VOC: the ``ImageSets/Main`` list; YOLO: a ``data.yaml`` key
    # (``train``, ``val``), a folder ``images/<split>`` or ``<split>/images`` (labels in the matching
    # ``labels`` folder), or a list file ``<split>.txt`` of image paths (see :mod:`ssd.data.yolo`)
    split: list[str] | str = "trainval"
    images: str | None = None  # COCO: the images folder
    annotations: str | None = None  # COCO: the instances JSON
    # foreground class names in label order (None: the 20 VOC classes, the COCO file's categories
    # sorted by id, YOLO's ``data.yaml`` ``names`` or ``classes.txt``); YOLO class id k is ``classes[k]``
    classes: list[str] | None = None
    keep_difficult: bool = False  # VOC difficult objects (always kept for evaluation)
    keep_empty: bool = True  # images without (usable) objects
    # train on a subset of the file's classes: objects of classes not in ``classes`` are dropped and
    # counted (VOC, COCO by name; YOLO ids beyond the list) instead of being an error
    ignore_other_classes: bool = False

    def __post_init__(self) -> None:
        check_choice("data.format", self.format, DATA_FORMATS)


# zoom-out canvas side over the image side: the paper's 16x area is 4; at 16 (256x the area) an object
# of a third of the image is 2% of the canvas side, below any prior of a 300 px model
MAX_EXPAND_RATIO = 16.0


@dataclass
class AugmentConfig:
    """The SSD training augmentation (paper Sec. 2.2 "Data augmentation"; ssd.pytorch's recipe).

    Photometric distortion, channel swap, zoom-out onto a mean-filled canvas, the paper's patch
    sampler, horizontal flip, and the resize to the model input.
    """

    # probability of each photometric op (brightness, contrast, saturation, hue), with contrast in
    # random order before or after the HSV ops
    photometric_p: float = 0.5
    brightness_delta: float = 32.0  # pixel levels of 255, added as U(-delta, delta)
    contrast_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # [low, high] of the factor
    saturation_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # [low, high] of the factor
    hue_delta: float = 18.0  # degrees, added as U(-delta, delta)
    channel_swap_p: float = 0.5  # probability of a random permutation of the colour channels
    expand_p: float = 0.5  # probability of the zoom-out
    expand_max_ratio: float = 4.0  # the zoom-out canvas side is U(1, this) times the image's
    # the patch sampler's options, one drawn per image (paper Sec. 2.2, torchvision's ``RandomIoUCrop``):
    # ``null`` keeps the whole image, ``0.0`` is a random patch, ``m`` a patch that some object overlaps
    # with IoU >= ``m``; a patch keeps the boxes whose centre it contains and needs at least one.
    # Images without objects are never cropped (no patch could keep a box).
    crop_min_ious: list[float | None] = field(default_factory=lambda: [None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # a patch side over the image's side
    crop_aspect: list[float] = field(default_factory=lambda: [0.5, 2.0])  # a patch's width over its height
    crop_max_trials: int = 50  # patches tried per option; when all fail, another option is drawn
    flip_p: float = 0.5  # probability of the horizontal flip

    def __post_init__(self) -> None:
        for name in ("contrast_range", "saturation_range", "crop_scale", "crop_aspect"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or lo_hi[0] <= 0:
                raise ConfigError(f"data.augment.{name} must be [low, high] with 0 < low <= high, got {lo_hi}")
        if self.crop_scale[1] > 1.0:  # a patch is part of the image: a larger window reads past its edges
            raise ConfigError(f"data.augment.crop_scale must lie within (0, 1] of the image, got {self.crop_scale}")
        for name in ("photometric_p", "channel_swap_p", "expand_p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.augment.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name, high, unit in (("brightness_delta", 255.0, "pixel levels"), ("hue_delta", 180.0, "degrees")):
            if not 0.0 <= getattr(self, name) <= high:
                raise ConfigError(f"data.augment.{name} must be in [0, {high:g}] {unit}, got {getattr(self, name)}")
        if not 1.0 <= self.expand_max_ratio <= MAX_EXPAND_RATIO:
            raise ConfigError(
                f"data.augment.expand_max_ratio must be in [1, {MAX_EXPAND_RATIO:g}] (the canvas side over the "
                f"image's), got {self.expand_max_ratio}"
            )
        if not self.crop_min_ious:
            raise ConfigError("data.augment.crop_min_ious needs at least one option (null keeps the whole image)")
        if any(m is not None and not 0.0 <= m <= 1.0 for m in self.crop_min_ious):
            raise ConfigError(
                f"data.augment.crop_min_ious: each option is null (whole image) or a minimum IoU in [0, 1], "
                f"got {self.crop_min_ious}"
            )
        if self.crop_max_trials < 1:
            raise ConfigError(f"data.augment.crop_max_trials must be >= 1, got {self.crop_max_trials}")


@dataclass
class DataConfig:
    """The datasets, their training augmentation, and how the loader reads them."""

    train: DatasetConfig = field(default_factory=DatasetConfig)  # the training split
    # the split evaluated, during training and by ``ssd eval``
    val: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training only
    # loader worker processes per training process; null (the default): follow the machine, its CPUs
    # shared by the processes on it, at most 8 (ssd.data.loader.default_num_workers)
    num_workers: int | None = None
    # added to the loader workers' nice value (0-19, Unix): on a CPU-only machine a lower priority lets
    # the training threads keep the cores and augmentation fill their idle moments (the demo uses 19)
    worker_nice: int = 0
    # what a bad file does: "raise" stops with a clear error; "skip" drops the sample and counts it
    # (each file warned about once, by name; an epoch's count logged when it changes); "auto" raises
    # while a dataset is indexed and validated, skips while training reads images
    on_error: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data.on_error", self.on_error, ON_ERROR)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.worker_nice <= 19:
            raise ConfigError(f"data.worker_nice must be in 0..19 (a nice increment), got {self.worker_nice}")
