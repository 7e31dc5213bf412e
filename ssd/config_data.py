"""The ``data`` section of the configuration: dataset splits, the training augmentation, loader settings.

Split out of :mod:`ssd.config` (which re-exports every name here, so ``from ssd.config import
DatasetConfig`` keeps working); the rules of :mod:`ssd.config` hold: every default lives in the
dataclass, ``__post_init__`` checks values and names the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssd.config_io import ConfigError, _check_choice

DATA_FORMATS = ("voc", "coco", "yolo")
ON_ERROR = ("auto", "raise", "skip")


@dataclass
class DatasetConfig:
    """One dataset split.

    VOC (``format: voc``): ``root`` is a VOCdevkit-style folder (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/<split>.txt``); several roots with one split each concatenate (VOC07+12):
    ``root: [VOC2007, VOC2012]``, ``split: [trainval, trainval]`` (one split applies to all roots).
    COCO (``format: coco``): ``images`` folder and ``annotations`` instances JSON.
    YOLO (``format: yolo``): ``root`` as VOC's; ``split`` is a ``data.yaml`` key (``train``, ``val``), a
    folder ``images/<split>`` or ``<split>/images`` (labels in the matching ``labels`` folder), or a list
    file ``<split>.txt`` of image paths; see :mod:`ssd.data.yolo`.
    ``classes``: foreground class names in label order (None: the 20 VOC classes, the COCO file's
    categories sorted by id, YOLO's ``data.yaml`` ``names`` or ``classes.txt``; YOLO class id k is
    ``classes[k]``). ``ignore_other_classes``: objects of classes not in ``classes`` are dropped and
    counted (VOC, COCO by name; YOLO ids beyond the list) instead of being an error.
    Relative ``root``, ``images`` and ``annotations`` (and ``model.init`` paths) are resolved against the
    working directory, not the config file's folder: an override ``data.train.root=...`` then means what
    the shell means, the shipped configs' ``data/...`` work from the repository root, and a run's saved
    ``config.yaml`` works from where the run started. Paths inside a dataset follow its own rules.
    """

    format: str = "voc"
    root: list[str] | str | None = None
    split: list[str] | str = "trainval"
    images: str | None = None
    annotations: str | None = None
    classes: list[str] | None = None
    keep_difficult: bool = False  # VOC difficult objects (always kept for evaluation)
    keep_empty: bool = True  # images without (usable) objects
    ignore_other_classes: bool = False  # train on a subset of the file's classes

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, DATA_FORMATS)


# zoom-out canvas side over the image side: the paper's 16x area is 4; at 16 (256x the area) an object
# of a third of the image is 2% of the canvas side, below any prior of a 300 px model
MAX_EXPAND_RATIO = 16.0


@dataclass
class AugmentConfig:
    """The SSD training augmentation (paper Sec. 2.2 "Data augmentation"; ssd.pytorch's recipe).

    Photometric distortion (each op applied with probability ``photometric_p``, in random order of
    contrast before or after the HSV ops), zoom-out onto a mean-filled canvas up to
    ``expand_max_ratio`` x, the paper's patch sampler, horizontal flip, then resize to the model input.
    ``crop_min_ious``: the patch sampler's options, one drawn per image (paper Sec. 2.2, torchvision's
    ``RandomIoUCrop``): ``null`` keeps the whole image, ``0.0`` is a random patch, ``m`` a patch that
    some object overlaps with IoU >= ``m``; a patch keeps the boxes whose centre it contains and needs
    at least one. When an option's ``crop_max_trials`` windows all fail, another option is drawn.
    Images without objects are never cropped (no patch could keep a box).
    """

    photometric_p: float = 0.5
    brightness_delta: float = 32.0  # pixel levels of 255
    contrast_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    saturation_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    hue_delta: float = 18.0  # degrees
    channel_swap_p: float = 0.5
    expand_p: float = 0.5
    expand_max_ratio: float = 4.0
    crop_min_ious: list[float | None] = field(default_factory=lambda: [None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    crop_aspect: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_max_trials: int = 50
    flip_p: float = 0.5

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
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="test"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
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
        _check_choice("data.on_error", self.on_error, ON_ERROR)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.worker_nice <= 19:
            raise ConfigError(f"data.worker_nice must be in 0..19 (a nice increment), got {self.worker_nice}")
