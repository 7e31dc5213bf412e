"""Fine-tuning: start a model from another checkpoint (``model.init`` / ``model.init_backbone``).

Two steps, in this order, before anything is built from the config:

1. :func:`adopt_source_config`: the run trains with what the source checkpoint was trained with.
   Its preprocessing (``channel_order``, ``pixel_scale``, ``mean``, ``std``, ``resize``) and, for
   ``model.init``, its prior layout are taken for every key the user did not set
   (:func:`ssd.config.is_user_set`; one INFO line per adopted key, old -> new); a key the user set to
   another value stops with a :class:`ConfigError` naming both values.
2. :func:`init_weights_from`: every tensor whose name and shape match is loaded.

Priors are adopted only when the source has as many feature levels as the model; fractions of the
input (``scales``, ``aspect_ratios``, ``clip``, ``variances``) at any input size, pixels
(``min_sizes``/``max_sizes``, ``steps``, arch presets) only at the source's input size (a warning
says what was left). A trunk-only checkpoint (``init_backbone``, ``ssd convert --from vgg16``) gives
preprocessing only. docs/finetuning.md states the rule for users.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ssd.checkpoint import CheckpointError, checkpoint_model_config, load_checkpoint
from ssd.config import Config, ConfigError, ModelConfig, is_user_set
from ssd.engine.bn import bn_layers
from ssd.engine.class_rows import load_class_rows
from ssd.model.priors import resolve_prior_layout
from ssd.weights import resolve_weights

log = logging.getLogger("ssd.train")

PREPROCESS_KEYS = ("channel_order", "pixel_scale", "mean", "std", "resize")
SIZE_KEYS = ("scales", "min_sizes", "max_sizes")  # three spellings of one thing: the prior sizes
TRUNK_LEVELS = 2  # VGG16Trunk feeds conv4_3 and fc7 to the heads; every extra block adds one level
_HOW_TO_FIX = (
    "remove the key from the config (or the override) to train with the checkpoint's value, or set it to that value "
    "(every key of a run's config.yaml counts as set)"
)


@dataclass
class Source:
    """A checkpoint named by ``model.init`` or ``model.init_backbone``, and the model config it carries."""

    key: str
    path: str
    model: ModelConfig
    trunk_only: bool  # its priors mean nothing

    def __str__(self) -> str:
        return f"{self.key} {self.path}"


def read_source(key: str, path: str) -> Source:
    path = resolve_weights(path)  # torchvision:NAME or a URL: the cached checkpoint
    ckpt = load_checkpoint(path)
    trunk_only = key == "model.init_backbone" or ckpt.get("kind") == "backbone"
    return Source(key, path, checkpoint_model_config(ckpt, path), trunk_only)


def adopt_source_config(cfg: Config) -> Config:
    """``cfg`` with the preprocessing and priors of its ``model.init`` / ``model.init_backbone``
    checkpoints wherever the user left them unset (a new config; ``cfg`` is not modified).

    Raises :class:`ConfigError` when a user-set key differs from a source, or when ``init`` and
    ``init_backbone`` were trained with different preprocessing. ``init`` alone decides the priors.
    """
    model = cfg.model
    sources = [
        read_source(k, p) for k, p in (("model.init", model.init), ("model.init_backbone", model.init_backbone)) if p
    ]
    if not sources:
        return cfg
    preprocess = _adopt_preprocess(cfg, sources)
    detector = [s for s in sources if not s.trunk_only]
    priors = _adopt_priors(cfg, detector[0]) if detector else {}
    if not preprocess and not priors:
        return cfg
    model = dataclasses.replace(
        model,
        preprocess=dataclasses.replace(model.preprocess, **preprocess),
        priors=dataclasses.replace(model.priors, **priors),
    )
    return dataclasses.replace(cfg, model=model)  # keeps cfg.user_keys: adopted keys stay "not set by the user"


def _adopt_preprocess(cfg: Config, sources: list[Source]) -> dict[str, Any]:
    wanted: dict[str, tuple[Any, Source]] = {}
    for source in sources:
        for name in PREPROCESS_KEYS:
            value = getattr(source.model.preprocess, name)
            if name in wanted and not _same(wanted[name][0], value):
                first, first_source = wanted[name]
                raise ConfigError(
                    f"model.preprocess.{name}: {first_source} was trained with {first!r} but {source} with "
                    f"{value!r}; their weights expect different inputs: fine-tune from one of them"
                )
            wanted.setdefault(name, (value, source))
    current = cfg.model.preprocess
    return {
        name: value
        for name, (value, source) in wanted.items()
        if _adopt(cfg, f"model.preprocess.{name}", getattr(current, name), value, source)
    }


def _adopt_priors(cfg: Config, source: Source) -> dict[str, Any]:
    ours, theirs = cfg.model, source.model
    assert ours.extras is not None and theirs.extras is not None  # set by ModelConfig.__post_init__
    levels = TRUNK_LEVELS + len(ours.extras)
    if TRUNK_LEVELS + len(theirs.extras) != levels:
        log.warning(
            "%s has %d feature levels, this model %d: its priors are not adopted (its heads do not fit anyway)",
            source,
            TRUNK_LEVELS + len(theirs.extras),
            levels,
        )
        return {}
    mine, src = resolve_prior_layout(ours, levels), resolve_prior_layout(theirs, levels)
    changes: dict[str, Any] = {}
    # unitless: the same meaning at any input size
    for name, current, value in (
        ("aspect_ratios", mine["aspect_ratios"], src["aspect_ratios"]),
        ("clip", ours.priors.clip, theirs.priors.clip),
        ("variances", ours.priors.variances, theirs.priors.variances),
    ):
        if _adopt(cfg, f"model.priors.{name}", current, value, source):
            changes[name] = value
    left: list[str] = []  # pixel values of another input size: not adopted, named in one warning
    changes.update(_adopt_steps(cfg, source, mine["steps"], src["steps"], left))
    changes.update(_adopt_sizes(cfg, source, mine, src, left))
    if left:
        log.warning(
            "%s was trained at %s px input, this model takes %s px: its prior %s not adopted (pixels of another input "
            "size); set model.priors.scales (fractions of the input) to choose",
            source,
            theirs.input_size,
            ours.input_size,
            " and ".join(left) + (" are" if len(left) > 1 else " is"),
        )
    return changes


def _adopt_steps(
    cfg: Config, source: Source, mine: list | None, theirs: list | None, left: list[str]
) -> dict[str, Any]:
    """Steps are pixels: adopted at the source's input size only. None (derived from the feature map
    sizes) is left to this model's own rule."""
    ours_model, theirs_model = cfg.model, source.model
    if ours_model.input_size == theirs_model.input_size:
        return (
            {"steps": theirs} if theirs is not None and _adopt(cfg, "model.priors.steps", mine, theirs, source) else {}
        )
    explicit = theirs_model.priors.steps
    if (
        explicit is not None
        and not _same(ours_model.priors.steps, explicit)
        and not is_user_set(cfg, "model.priors.steps")
    ):
        left.append(f"steps {explicit}")
    return {}


def _adopt_sizes(cfg: Config, source: Source, mine: dict, src: dict, left: list[str]) -> dict[str, Any]:
    """Prior sizes compare as fractions of each model's input; ``scales`` are adopted at any input
    size, pixel sizes (``min_sizes``/``max_sizes``, arch presets) at the source's input size only."""
    ours, theirs = cfg.model, source.model
    if _same((mine["min_scales"], mine["max_scales"]), (src["min_scales"], src["max_scales"])):
        return {}
    user_set = [f"model.priors.{k}" for k in SIZE_KEYS if is_user_set(cfg, f"model.priors.{k}")]
    adoptable = ours.input_size == theirs.input_size or theirs.priors.scales is not None
    if user_set and adoptable:
        raise ConfigError(
            f"{', '.join(user_set)}: the config sets {_describe_sizes(ours, mine)} but {source} was trained "
            f"with {_describe_sizes(theirs, src)}; {_HOW_TO_FIX}"
        )
    if not adoptable:
        if not user_set:
            left.append(_describe_sizes(theirs, src))
        return {}
    sizes = _source_sizes(theirs, src)
    for name in SIZE_KEYS:
        if not _same(getattr(ours.priors, name), sizes[name]):
            log.info(
                "model.priors.%s: %r -> %r (adopted from %s)", name, getattr(ours.priors, name), sizes[name], source
            )
    return sizes


def _adopt(cfg: Config, key: str, current: Any, value: Any, source: Source) -> bool:
    """True when ``key`` takes the source's ``value``: it differs and the user did not set it (logged)."""
    if _same(current, value):
        return False
    if is_user_set(cfg, key):
        raise ConfigError(f"{key}: the config sets {current!r} but {source} was trained with {value!r}; {_HOW_TO_FIX}")
    log.info("%s: %r -> %r (adopted from %s)", key, current, value, source)
    return True


def _same(a: Any, b: Any) -> bool:
    """Equal values, floats to 1e-6 relative (a hand-typed 1/255 or a YAML round trip still matches)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _source_sizes(model: ModelConfig, layout: dict) -> dict[str, Any]:
    """The source's prior sizes in its own spelling; an arch preset or the Caffe rule as pixel sizes."""
    p = model.priors
    if p.scales is not None:
        return {"scales": list(p.scales), "min_sizes": None, "max_sizes": None}
    if p.min_sizes is not None:
        assert p.max_sizes is not None  # PriorConfig.__post_init__: given together
        return {"scales": None, "min_sizes": list(p.min_sizes), "max_sizes": list(p.max_sizes)}
    size = model.input_size
    return {
        "scales": None,
        "min_sizes": [round(s * size, 6) for s in layout["min_scales"]],
        "max_sizes": [round(s * size, 6) for s in layout["max_scales"]],
    }


def _describe_sizes(model: ModelConfig, layout: dict) -> str:
    sizes = _source_sizes(model, layout)
    if sizes["scales"] is not None:
        return f"scales {sizes['scales']}"
    preset = "" if model.priors.min_sizes is not None else f" (derived for {model.arch} at {model.input_size} px)"
    return f"min_sizes {sizes['min_sizes']} / max_sizes {sizes['max_sizes']}{preset}"


def init_weights_from(
    model: nn.Module, path: str, backbone_only: bool, classes: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Load every tensor of ``path`` whose name and shape match the model; report the rest.

    With the model's ``classes`` (foreground names) and a checkpoint that lists its own, the class
    heads' rows are matched by name (:mod:`ssd.engine.class_rows`) whenever the lists differ, whatever
    the counts. Returns ``{"loaded": [...], "by_class": [...] (class rows matched by name),
    "reinitialised": [...] (shape differs, e.g. a head with another class count, or no class in
    common), "ignored": [...] (not in the model)}``; all are logged.
    """
    path = resolve_weights(path)
    obj = load_checkpoint(path)
    state = obj["model"]
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "by_class": [], "reinitialised": [], "ignored": []}
    update = {}
    by_class = None
    if classes is not None and not backbone_only and obj.get("classes"):
        by_class = load_class_rows(own, state, list(classes), list(obj["classes"]), path)
    for key, value in state.items():
        if backbone_only and not key.startswith("backbone."):
            report["ignored"].append(key)
        elif by_class is not None and key in by_class[0]:
            update[key] = by_class[0][key]
            report["by_class"].append(key)
        elif by_class is not None and key in by_class[1]:
            report["reinitialised"].append(key)
        elif key not in own:
            report["ignored"].append(key)
        elif own[key].shape != value.shape:
            report["reinitialised"].append(key)
        else:
            update[key] = value
            report["loaded"].append(key)
    if not any(v.is_floating_point() for v in update.values()):  # BN's num_batches_tracked counters always fit
        raise CheckpointError(f"{path}: no tensor matches this model by name and shape; is it the right architecture?")
    model.load_state_dict(update, strict=False)
    if not backbone_only:
        _log_head_bn_mismatch(path, own, state)
    log.info(
        "init from %s: loaded %d tensors%s, re-initialised %d (shape differs: %s), ignored %d (%s)",
        path,
        len(report["loaded"]),
        f", {len(report['by_class'])} by class name" if report["by_class"] else "",
        len(report["reinitialised"]),
        ", ".join(report["reinitialised"][:6]) or "-",
        len(report["ignored"]),
        ", ".join(report["ignored"][:6]) or "-",
    )
    return report


def _head_bn_layers(state: dict) -> list[str]:
    """The prediction heads' BN layers (``head.loc_bn.i``, ``head.conf_bn.i``) named in a state dict."""
    suffix = ".running_mean"
    return [
        k.removesuffix(suffix) for k in state if k.startswith(("head.loc_bn.", "head.conf_bn.")) and k.endswith(suffix)
    ]


def _spans(layers: list[str]) -> str:
    """``head.loc_bn.0, head.loc_bn.1, head.loc_bn.2`` -> ``head.loc_bn.0..2``."""
    groups: dict[str, list[int]] = {}
    for name in layers:
        prefix, _, index = name.rpartition(".")
        groups.setdefault(prefix, []).append(int(index))
    return ", ".join(
        f"{prefix}.{min(i)}..{max(i)}" if len(i) > 1 else f"{prefix}.{i[0]}" for prefix, i in groups.items()
    )


def _log_head_bn_mismatch(path: str, own: dict, state: dict) -> None:
    """One line when the model and the checkpoint disagree about BN in the heads (``model.batch_norm``
    ``heads``): which layers start fresh and what happens to the head convs' biases."""
    mine, theirs = _head_bn_layers(own), _head_bn_layers(state)
    if mine and not theirs:
        biases = [k for k in state if k.startswith(("head.loc.", "head.conf.")) and k.endswith(".bias")]
        log.info(
            "init from %s: %s start fresh (not in the checkpoint, trained without BN in the heads)%s",
            path,
            _spans(mine),
            f"; its head conv biases ({len(biases)}) are not used: with BN in the heads the convs have none, BN's "
            "shift takes their place"
            if biases
            else "",
        )
    elif theirs and not mine:
        log.info(
            "init from %s: its head BN layers %s are not used (model.batch_norm has no 'heads'); the head convs load "
            "their weights, which were trained to feed those BN layers, and their biases start at 0",
            path,
            _spans(theirs),
        )


def freeze_blocks(model: nn.Module, blocks: list[str]) -> list[str]:
    """``train.freeze``: the VGG16 blocks (``conv1`` ... ``conv5``) whose parameters do not train.

    Caffe SSD, the paper's code, fine-tunes from ImageNet VGG16 with ``conv1_x`` and ``conv2_x`` frozen
    ("no backward": ``freeze_layers`` in ``ssd_pascal.py``). Their parameters stop requiring gradients,
    so they get no weight gradient, leave the optimizer, and when they are a prefix of the network autograd
    runs no backward through them at all (on SSD300 conv1 and conv2 are 8.4 of the 34.9 GMAC of the forward).
    Their BatchNorm layers, if any, keep their running statistics. Returns the names of those BN layers
    (the caller freezes them after every ``model.train()``)."""
    prefixes = tuple(f"backbone.{block}." for block in blocks)
    frozen = [p for name, p in model.named_parameters() if name.startswith(prefixes)]
    for p in frozen:
        p.requires_grad_(False)
    if blocks:
        log.info("train.freeze: %s do not train (%d parameters)", ", ".join(blocks), sum(p.numel() for p in frozen))
    return [name for name, _ in bn_layers(model) if name.startswith(prefixes)]


def warn_frozen_untrained(blocks: list[str], loaded_keys: list[str]) -> None:
    """Warn for each ``train.freeze`` block that nothing loaded: it keeps its random initialisation."""
    for block in blocks:
        if not any(key.startswith(f"backbone.{block}.") for key in loaded_keys):
            log.warning(
                "train.freeze: %s was not loaded from model.init or model.init_backbone, so it stays at its random "
                "initialisation; freeze only blocks that come with trained weights",
                block,
            )
