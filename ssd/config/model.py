"""The ``model`` section: the VGG16-SSD network, its default boxes and its input preprocessing.

Every default of the section lives in these dataclasses; ``__post_init__`` checks values and names
the dotted key. Only ``build_*`` functions read a config; modules take plain arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ssd.config.io import ConfigError, check_choice

BN_BLOCKS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc", "extras", "heads")
BN_ALL = BN_BLOCKS[:-1]  # ``all``: every feature block (conv1..conv5, fc6/fc7, extras), not the prediction heads
CLIP_MODES = ("corners", "wh", "none")
CHANNEL_ORDERS = ("rgb", "bgr")
RESIZE_MODES = ("bilinear", "normalize_then_bilinear")


@dataclass
class ExtraLayer:
    """One extra feature block: 1x1 conv to ``mid`` channels, then a ``kernel`` conv to ``out``."""

    mid: int  # channels of the 1x1 conv
    out: int  # channels of the block's output, one feature level
    kernel: int = 3  # the second conv's kernel size; with stride and padding it sets the level's map size
    stride: int = 2  # the second conv's stride
    padding: int = 1  # the second conv's padding


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

    Sizes come from either ``scales`` or ``min_sizes``/``max_sizes``. With neither, the arch preset is
    used for ssd300/ssd512 at their native input size, else the Caffe SSD rule (first level 0.1, then
    0.2..0.9 linearly).
    """

    # fractions of the input side, one per level plus one, torchvision style: level k uses s_k and sqrt(s_k * s_k+1)
    scales: list[float] | None = None
    min_sizes: list[float] | None = None  # input pixels, one per level; given together with max_sizes
    max_sizes: list[float] | None = None  # input pixels, one per level: the extra square prior is sqrt(min * max)
    # per level, the ratios r besides 1 (each adds an r and a 1/r box); None: the paper's [2] on the
    # first and the last two levels, [2, 3] elsewhere
    aspect_ratios: list[list[float]] | None = None
    # pixels between prior centres, one per level; None: the arch preset at native size, else input / feature size
    steps: list[float] | None = None
    # ``corners`` clamps all four (cx, cy, w, h) values to [0, 1] (ssd.pytorch, lufficc), ``wh`` clamps
    # only w and h (torchvision), ``none`` leaves priors unclipped
    clip: str = "corners"
    # box coding: centre offsets are divided by the first, log size ratios by the second
    variances: list[float] = field(default_factory=lambda: [0.1, 0.2])

    def __post_init__(self) -> None:
        check_choice("model.priors.clip", self.clip, CLIP_MODES)
        if len(self.variances) != 2 or min(self.variances) <= 0:
            raise ConfigError(f"model.priors.variances must be two positive numbers, got {self.variances}")
        if self.scales is not None and (self.min_sizes is not None or self.max_sizes is not None):
            raise ConfigError("model.priors: give either scales or min_sizes/max_sizes, not both")
        if (self.min_sizes is None) != (self.max_sizes is None):
            raise ConfigError("model.priors: min_sizes and max_sizes must be given together")


@dataclass
class PreprocessConfig:
    """How an RGB uint8 image becomes the network input: ``(pixel * pixel_scale - mean) / std``."""

    channel_order: str = "rgb"  # the order the network expects (ssd.pytorch was trained on BGR)
    pixel_scale: float = 1.0 / 255.0  # 1/255: mean and std on the 0..1 scale (1.0: pixel levels, the Caffe ports)
    # per channel, in ``channel_order``; the defaults are ImageNet's (torchvision VGG)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # ``bilinear`` resizes the uint8 image then normalises; ``normalize_then_bilinear`` normalises
    # first and resizes the float tensor (torchvision's GeneralizedRCNNTransform)
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        check_choice("model.preprocess.channel_order", self.channel_order, CHANNEL_ORDERS)
        check_choice("model.preprocess.resize", self.resize, RESIZE_MODES)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("model.preprocess: mean and std need 3 values each, std > 0")


@dataclass
class ModelConfig:
    """The VGG16-SSD network."""

    arch: str = "ssd300"  # ssd300 | ssd512: picks the extras, prior and input-size presets
    # counts the background (class 0): 21 for VOC, 81 for COCO (91 for torchvision's ids)
    num_classes: int = 21
    input_size: int | None = None  # the square input's side; None: 300 for ssd300, 512 for ssd512
    width: float = 1.0  # multiplies every channel count (small, fast variants)
    # the blocks of BN_BLOCKS that get BatchNorm, or ``none``, or ``all`` (every feature block,
    # BN_ALL; ``[all, heads]`` adds the prediction heads); stored as a list in BN_BLOCKS order
    batch_norm: list[str] | str = "none"
    bn_eps: float = 1e-5  # BatchNorm's epsilon, added to the variance
    # PyTorch's (weight of the new batch statistic): TensorFlow's ``decay`` d corresponds to
    # ``momentum = 1 - d`` (TF's 0.999 -> 0.001, 0.99 -> 0.01)
    bn_momentum: float = 0.1
    dropout: float = 0.5  # after fc6 and fc7; the paper (and its reproduction configs) use 0
    l2norm_scale: float = 20.0  # initial per-channel scale of the L2Norm on conv4_3 (learned; ParseNet's 20)
    fc6_dilation: int = 6  # the paper's atrous fc6 on a 19x19 (300 px) map; smaller inputs want less
    extras: list[ExtraLayer] | None = None  # None: the arch preset
    priors: PriorConfig = field(default_factory=PriorConfig)  # the default boxes
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # image -> network input
    init: str | None = None  # checkpoint to fine-tune from: tensors whose name and shape match are loaded
    init_backbone: str | None = None  # converted ImageNet VGG trunk (ssd convert --from vgg16 ...)

    def __post_init__(self) -> None:
        check_choice("model.arch", self.arch, tuple(ARCH_EXTRAS))
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


def normalize_bn_blocks(value: list[str] | str | None) -> list[str]:
    """``all`` / ``none`` / a list of block names (``all`` in it: every feature block) -> the valid
    block names in ``BN_BLOCKS`` order."""
    if value is None or value == "none":
        return []
    if isinstance(value, str):
        value = [value]
    for name in value:
        check_choice("model.batch_norm", name, BN_BLOCKS + ("all", "none"))
    chosen = set(value) | (set(BN_ALL) if "all" in value else set())
    return [b for b in BN_BLOCKS if b in chosen]
