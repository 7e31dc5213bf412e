"""Typed configuration: every default of the framework lives in this file (the ``data`` section's in
:mod:`ssd.config_data`, re-exported here).

Configs are plain dataclasses. ``from_dict`` builds them from nested dicts (YAML),
checking every key and type; errors name the dotted key and suggest the closest
valid one. That generic machinery, and the record of which keys the user set, lives in
:mod:`ssd.config_io` (its names are importable from here too). Only ``build_*`` functions
read a config; modules take plain arguments.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ssd.config_data import DATA_FORMATS, ON_ERROR, AugmentConfig, DataConfig, DatasetConfig  # noqa: F401  (re-exported: the data section, ``from ssd.config import DatasetConfig``)
from ssd.config_io import (  # noqa: F401  (re-exported: ``from ssd.config import from_dict`` etc.)
    SCIENTIFIC_NUMBER,
    ConfigError,
    _check_choice,
    _coerce,
    apply_override,
    config_fields,
    from_dict,
    is_user_set,
    key_record,
    load_yaml,
    read_yaml_dict,
    recorded_keys,
    save_config,
    to_dict,
    user_keys,
)

BN_BLOCKS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc", "extras", "heads")
BN_ALL = BN_BLOCKS[:-1]  # ``all``: every feature block (conv1..conv5, fc6/fc7, extras), not the prediction heads
CLIP_MODES = ("corners", "wh", "none")
CHANNEL_ORDERS = ("rgb", "bgr")
RESIZE_MODES = ("bilinear", "normalize_then_bilinear")


# --- model -----------------------------------------------------------------------------


@dataclass
class ExtraLayer:
    """One extra feature block: 1x1 conv to ``mid`` channels, then a ``kernel`` conv to ``out``."""

    mid: int
    out: int
    kernel: int = 3
    stride: int = 2
    padding: int = 1


# SSD300 (paper Table/Fig. 2; ssd.pytorch `extras['300']`; torchvision `extra.1..4`): 19 -> 10 -> 5 -> 3 -> 1
SSD300_EXTRAS = [
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 1, 0),
    ExtraLayer(128, 256, 3, 1, 0),
]
# SSD512 (ssd.pytorch / lufficc): 32 -> 16 -> 8 -> 4 -> 2 -> 1, the last one a 4x4 conv with padding 1
SSD512_EXTRAS = [
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 4, 1, 1),
]
ARCH_EXTRAS = {"ssd300": SSD300_EXTRAS, "ssd512": SSD512_EXTRAS}

# Prior sizes in pixels of the input (ssd.pytorch `voc` / lufficc configs).
ARCH_PRIOR_SIZES: dict[str, tuple[list[float], list[float]]] = {
    "ssd300": ([30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315]),
    "ssd512": ([35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8], [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.65]),
}
ARCH_STEPS: dict[str, list[float]] = {"ssd300": [8, 16, 32, 64, 100, 300], "ssd512": [8, 16, 32, 64, 128, 256, 512]}
ARCH_INPUT_SIZE = {"ssd300": 300, "ssd512": 512}


@dataclass
class PriorConfig:
    """Default boxes (paper Sec. 2.2). Leave a field ``None`` to derive it.

    Sizes: give either ``scales`` (fractions of the input side, one per level plus one,
    torchvision style: level k uses s_k and sqrt(s_k * s_k+1)) or ``min_sizes``/``max_sizes``
    in input pixels. With neither, the arch preset is used for ssd300/ssd512 at their native
    input size, else the Caffe SSD rule (first level 0.1, then 0.2..0.9 linearly).
    ``steps`` (pixels) default to the arch preset at native size, else input / feature size.
    ``clip``: ``corners`` clamps all four (cx, cy, w, h) values to [0, 1] (ssd.pytorch, lufficc),
    ``wh`` clamps only w and h (torchvision), ``none`` leaves priors unclipped.
    """

    scales: list[float] | None = None
    min_sizes: list[float] | None = None
    max_sizes: list[float] | None = None
    aspect_ratios: list[list[float]] | None = None
    steps: list[float] | None = None
    clip: str = "corners"
    variances: list[float] = field(default_factory=lambda: [0.1, 0.2])

    def __post_init__(self) -> None:
        _check_choice("model.priors.clip", self.clip, CLIP_MODES)
        if len(self.variances) != 2 or min(self.variances) <= 0:
            raise ConfigError(f"model.priors.variances must be two positive numbers, got {self.variances}")
        if self.scales is not None and (self.min_sizes is not None or self.max_sizes is not None):
            raise ConfigError("model.priors: give either scales or min_sizes/max_sizes, not both")
        if (self.min_sizes is None) != (self.max_sizes is None):
            raise ConfigError("model.priors: min_sizes and max_sizes must be given together")


@dataclass
class PreprocessConfig:
    """How an RGB uint8 image becomes the network input: ``(pixel * pixel_scale - mean) / std``.

    ``channel_order`` is the order the network expects (ssd.pytorch was trained on BGR).
    ``resize``: ``bilinear`` resizes the uint8 image then normalises; ``normalize_then_bilinear``
    normalises first and resizes the float tensor (torchvision's GeneralizedRCNNTransform).
    """

    channel_order: str = "rgb"
    pixel_scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet (torchvision VGG)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        _check_choice("model.preprocess.channel_order", self.channel_order, CHANNEL_ORDERS)
        _check_choice("model.preprocess.resize", self.resize, RESIZE_MODES)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("model.preprocess: mean and std need 3 values each, std > 0")


@dataclass
class ModelConfig:
    """The VGG16-SSD network.

    ``num_classes`` counts the background (class 0): 21 for VOC, 81 for COCO (91 for torchvision's ids).
    ``batch_norm`` lists the blocks of ``BN_BLOCKS`` that get BatchNorm, or ``none``, or ``all``
    (every feature block, ``BN_ALL``; ``[all, heads]`` adds the prediction heads).
    ``bn_momentum`` is PyTorch's (weight of the new batch statistic): TensorFlow's
    ``decay`` d corresponds to ``momentum = 1 - d`` (TF's 0.999 -> 0.001, 0.99 -> 0.01).
    ``width`` multiplies every channel count (small, fast variants); ``input_size`` is the square side.
    """

    arch: str = "ssd300"
    num_classes: int = 21
    input_size: int | None = None  # None: 300 for ssd300, 512 for ssd512
    width: float = 1.0
    batch_norm: list[str] | str = "none"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    dropout: float = 0.5  # after fc6 and fc7; the paper (and its reproduction configs) use 0
    l2norm_scale: float = 20.0
    fc6_dilation: int = 6  # the paper's atrous fc6 on a 19x19 (300 px) map; smaller inputs want less
    extras: list[ExtraLayer] | None = None  # None: the arch preset
    priors: PriorConfig = field(default_factory=PriorConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    init: str | None = None  # checkpoint to fine-tune from: tensors whose name and shape match are loaded
    init_backbone: str | None = None  # converted ImageNet VGG trunk (ssd convert --from vgg16 ...)

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, tuple(ARCH_EXTRAS))
        if self.input_size is None:
            self.input_size = ARCH_INPUT_SIZE[self.arch]
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must count background plus >= 1 class, got {self.num_classes}")
        if self.width <= 0:
            raise ConfigError(f"model.width must be > 0, got {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.fc6_dilation < 1:
            raise ConfigError(f"model.fc6_dilation must be >= 1, got {self.fc6_dilation}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ConfigError(f"model.bn_momentum must be in (0, 1] (momentum = 1 - TF decay), got {self.bn_momentum}")
        self.batch_norm = normalize_bn_blocks(self.batch_norm)
        if self.extras is None:
            self.extras = [dataclasses.replace(e) for e in ARCH_EXTRAS[self.arch]]

    @property
    def native_size(self) -> bool:
        """True when the input size is the arch's own (300 / 512), so its presets apply."""
        return self.input_size == ARCH_INPUT_SIZE[self.arch]


@dataclass
class LossConfig:
    """Matching and MultiBox loss (paper Sec. 2.2)."""

    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    box_weight: float = 1.0  # alpha in the paper's L = (L_conf + alpha L_loc) / N

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"loss.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.neg_pos_ratio < 0:
            raise ConfigError(f"loss.neg_pos_ratio must be >= 0, got {self.neg_pos_ratio}")


@dataclass
class PostprocessConfig:
    """Inference decoding (paper Sec. 3: score 0.01, NMS 0.45, 200 per image; torchvision top-k 400)."""

    score_threshold: float = 0.01
    nms_threshold: float = 0.45
    topk_candidates: int = 400
    detections_per_image: int = 200


# --- training and evaluation ---------------------------------------------------------------

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")
AMP_MODES = ("fp16", "bf16", "none")
BN_MODES = ("train", "frozen", "sync")
CHANNELS_LAST = ("auto", "true", "false")
FREEZE_BLOCKS = ("conv1", "conv2", "conv3", "conv4", "conv5")


@dataclass
class TrainConfig:
    """Iteration-based training. ``batch_size`` is the global batch, split evenly across processes,
    so a recipe means the same thing on 1 or 8 GPUs. ``amp`` applies on CUDA only (fp32 on CPU).
    ``channels_last`` (NHWC activations): ``auto`` is on for the CPU and CUDA, where it is faster
    (measured, see README "Performance"), off elsewhere; ``true`` / ``false`` force it. ``sync_debug``
    (CUDA): steps between log steps run under ``torch.cuda.set_sync_debug_mode("error")``, so any
    host-device synchronisation in a steady-state step raises (a check, not for production runs).
    ``bn``: ``train`` (batch statistics), ``frozen`` (the BN layers whose running statistics came from
    ``model.init`` / ``init_backbone`` keep them and fixed affine parameters; the others train),
    ``sync`` (SyncBatchNorm under DDP). ``precise_bn_batches`` > 0 recomputes the
    population statistics of the training BN layers over that many training batches (its own loader)
    after training and before every evaluation with ``precise_bn_before_eval``. ``freeze`` lists VGG16
    blocks that do not train (Caffe SSD's ``freeze_layers``: conv1 and conv2 when fine-tuning from
    ImageNet weights); a frozen prefix of the network also gets no backward pass. ``ema`` (a decay in
    (0, 1), e.g. 0.999; null: off) keeps an exponential moving average of the weights, evaluated beside
    them; the checkpoints' default weights are then the average (:mod:`ssd.engine.ema`)."""

    max_iter: int = 120000
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    schedule: str = "multistep"
    steps: list[int] = field(default_factory=lambda: [80000, 100000])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3.0
    clip_grad_norm: float | None = None
    amp: str = "fp16"
    channels_last: str | bool = "auto"  # auto | true | false (read as the strings "true" / "false")
    compile: bool = False
    sync_debug: bool = False
    freeze: list[str] = field(default_factory=list)  # e.g. [conv1, conv2] (the paper's Caffe recipe)
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    checkpoint_period: int = 5000
    eval_period: int = 10000
    log_period: int = 20
    bn: str = "train"
    precise_bn_batches: int = 0
    precise_bn_before_eval: bool = False
    ema: float | None = None  # decay of the weights' moving average (warmed up: min(ema, (1 + n) / (10 + n)))
    max_bad_steps: int = 10  # consecutive non-finite losses before training stops
    time_limit: float | None = None  # seconds of training, counted across resumes; stops early (the CPU demo's budget)
    schedule_by_time: bool = False  # the schedule follows the larger of iterations and time_limit spent (not bit-exact)
    retain_host_memory: bool = True  # keep freed host memory for the next step (glibc; ~7% faster CPU steps)
    tensorboard: bool = True  # OUTPUT_DIR/tensorboard: scalars + drawn validation images, if tensorboard is installed
    tensorboard_images: int = 4  # validation images drawn at every evaluation

    def __post_init__(self) -> None:
        if isinstance(self.channels_last, bool):  # YAML `channels_last: true`, and configs written before "auto"
            self.channels_last = str(self.channels_last).lower()
        _check_choice("train.channels_last", self.channels_last, CHANNELS_LAST)
        for block in self.freeze:
            _check_choice("train.freeze", block, FREEZE_BLOCKS)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train.schedule", self.schedule, SCHEDULES)
        _check_choice("train.amp", self.amp, AMP_MODES)
        _check_choice("train.bn", self.bn, BN_MODES)
        for name in ("max_iter", "batch_size", "checkpoint_period", "eval_period", "log_period", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"train.ema must be a decay in (0, 1), e.g. 0.999, or null (off); got {self.ema}")
        if self.schedule_by_time and not self.time_limit:
            raise ConfigError("train.schedule_by_time needs train.time_limit (seconds)")


@dataclass
class EvalConfig:
    batch_size: int = 32
    metric: str = "auto"  # voc07 | voc | coco | auto (voc07 for VOC data, coco for COCO data)
    voc_pixel_convention: str = "inclusive"  # +1 on widths/heights as the VOC devkit (official numbers)

    def __post_init__(self) -> None:
        _check_choice("eval.metric", self.metric, ("auto", "voc07", "voc", "coco"))
        _check_choice("eval.voc_pixel_convention", self.voc_pixel_convention, ("inclusive", "continuous"))


# --- the whole config ----------------------------------------------------------------------


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the dotted keys the YAML file(s) and overrides set (not a config key: never read or written as one)
    user_keys: frozenset[str] = key_record()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config and apply dotted ``key=value`` overrides (values parsed as YAML).

    The returned config records the dotted keys the file and the overrides set
    (``cfg.user_keys``; ask with :func:`ssd.config_io.is_user_set`): every key written in the
    file counts, so loading a run's resolved ``config.yaml`` sets every key.
    """
    return load_yaml(Config, path, overrides)  # an error in the file names it and the line


def normalize_bn_blocks(value: list[str] | str | None) -> list[str]:
    """``all`` / ``none`` / a list of block names (``all`` in it: every feature block) -> the valid
    block names in ``BN_BLOCKS`` order."""
    if value is None or value == "none":
        return []
    if isinstance(value, str):
        value = [value]
    for name in value:
        _check_choice("model.batch_norm", name, BN_BLOCKS + ("all", "none"))
    chosen = set(value) | (set(BN_ALL) if "all" in value else set())
    return [b for b in BN_BLOCKS if b in chosen]
