"""Typed configuration: every default of the framework lives in this package, one module per idea.

- :mod:`ssd.config.model`: the ``model`` section (network, default boxes, preprocessing)
- :mod:`ssd.config.data`: the ``data`` section (dataset splits, augmentation, loader)
- :mod:`ssd.config.train`: the ``loss`` and ``train`` sections (what training minimises, how it runs)
- :mod:`ssd.config.eval`: the ``postprocess`` and ``eval`` sections (decoding detections, scoring them)
- :mod:`ssd.config.io`: the generic machinery: YAML, dotted overrides, ``from_dict`` / ``to_dict``,
  the record of which keys the user set

Configs are plain dataclasses. ``from_dict`` builds them from nested dicts (YAML), checking every key
and type; errors name the dotted key and suggest the closest valid one. Every public name is importable
from here (``from ssd.config import ModelConfig, load_config``). Only ``build_*`` functions read a
config; modules take plain arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ssd.config.data import DATA_FORMATS, ON_ERROR, AugmentConfig, DataConfig, DatasetConfig
from ssd.config.eval import EvalConfig, PostprocessConfig
from ssd.config.io import (
    SCIENTIFIC_NUMBER,
    ConfigError,
    apply_override,
    check_choice,
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
from ssd.config.model import (
    ARCH_EXTRAS,
    ARCH_INPUT_SIZE,
    ARCH_PRIOR_SIZES,
    ARCH_STEPS,
    BN_ALL,
    BN_BLOCKS,
    CHANNEL_ORDERS,
    CLIP_MODES,
    RESIZE_MODES,
    SSD300_EXTRAS,
    SSD512_EXTRAS,
    ExtraLayer,
    ModelConfig,
    PreprocessConfig,
    PriorConfig,
    normalize_bn_blocks,
)
from ssd.config.train import (
    AMP_MODES,
    BN_MODES,
    CHANNELS_LAST,
    FREEZE_BLOCKS,
    OPTIMIZERS,
    SCHEDULES,
    LossConfig,
    TrainConfig,
)

__all__ = [
    # the whole config
    "Config",
    "load_config",
    # model
    "ARCH_EXTRAS",
    "ARCH_INPUT_SIZE",
    "ARCH_PRIOR_SIZES",
    "ARCH_STEPS",
    "BN_ALL",
    "BN_BLOCKS",
    "CHANNEL_ORDERS",
    "CLIP_MODES",
    "RESIZE_MODES",
    "SSD300_EXTRAS",
    "SSD512_EXTRAS",
    "ExtraLayer",
    "ModelConfig",
    "PreprocessConfig",
    "PriorConfig",
    "normalize_bn_blocks",
    # data
    "DATA_FORMATS",
    "ON_ERROR",
    "AugmentConfig",
    "DataConfig",
    "DatasetConfig",
    # loss and train
    "AMP_MODES",
    "BN_MODES",
    "CHANNELS_LAST",
    "FREEZE_BLOCKS",
    "OPTIMIZERS",
    "SCHEDULES",
    "LossConfig",
    "TrainConfig",
    # postprocess and eval
    "EvalConfig",
    "PostprocessConfig",
    # YAML, overrides, dict <-> dataclass, the user-set keys
    "SCIENTIFIC_NUMBER",
    "ConfigError",
    "apply_override",
    "check_choice",
    "config_fields",
    "from_dict",
    "is_user_set",
    "key_record",
    "load_yaml",
    "read_yaml_dict",
    "recorded_keys",
    "save_config",
    "to_dict",
    "user_keys",
]


@dataclass
class Config:
    """The whole configuration: one field per YAML section, in the order ``to_dict`` writes them."""

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
    (``cfg.user_keys``; ask with :func:`is_user_set`): every key written in the
    file counts, so loading a run's resolved ``config.yaml`` sets every key.
    """
    return load_yaml(Config, path, overrides)  # an error in the file names it and the line
