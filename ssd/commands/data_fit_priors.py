"""``ssd data fit-priors CFG [--out NEW.yaml] [--max-input N] [--keep-input]``: read data.train's boxes,
fit the priors (:mod:`ssd.priorfit`), print the coverage before and after, write the new config.

The written config is the YAML file with the overrides applied and only the keys the fit changes
replaced (``model.priors`` sizes and aspect ratios; with a larger input also ``model.input_size``,
``model.extras``, ``model.fc6_dilation``); it is loaded and its model built before it is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ssd.config import Config, ConfigError, from_dict, load_config, read_yaml_dict, to_dict
from ssd.data.dataset import index_dataset
from ssd.data.records import DatasetError, Problems
from ssd.model import build_ssd
from ssd.model.resize import conv_macs_per_image
from ssd.priorfit import (
    TARGET_COVERAGE,
    Fit,
    best_prior_iou,
    coverage_from_best_iou,
    fit_input_and_priors,
    normalised_boxes,
)

BUCKETS = ("all", "small", "medium", "large")


def choose(fits: list[Fit], target: float = TARGET_COVERAGE) -> Fit:
    """The smallest input that reaches ``target``, else the highest coverage (the smaller input on a tie)."""
    reached = [f for f in fits if f.coverage >= target]

    def key(f: Fit) -> tuple[float, int]:
        assert f.model.input_size is not None  # set by ModelConfig.__post_init__
        return f.coverage, -f.model.input_size

    return reached[0] if reached else max(fits, key=key)


def fitted_config_dict(raw: dict, cfg: Config, fit: Fit) -> dict:
    """``raw`` (the YAML dict) with the keys the fit changes replaced; other keys stay as written."""
    model = raw.setdefault("model", {})
    priors = dict(model.get("priors") or {})
    priors.pop("scales", None)
    fitted = fit.model.priors  # from with_priors: sizes and aspect ratios set
    assert fitted.min_sizes is not None and fitted.max_sizes is not None and fitted.aspect_ratios is not None
    priors.update(
        min_sizes=list(fitted.min_sizes),
        max_sizes=list(fitted.max_sizes),
        aspect_ratios=[list(r) for r in fitted.aspect_ratios],
    )
    if fit.model.input_size != cfg.model.input_size:
        priors.pop("steps", None)  # pixels of the old input; the strides now follow the feature maps
        model["input_size"] = fit.model.input_size
        if fit.model.extras != cfg.model.extras:
            model["extras"] = to_dict(fit.model.extras)
        if fit.model.fc6_dilation != cfg.model.fc6_dilation:
            model["fc6_dilation"] = fit.model.fc6_dilation
    model["priors"] = priors
    return raw


def coverage_row(label: str, cov: dict) -> str:
    parts = [
        f"{k} {cov[k]['recall']:.1%} of {cov[k]['boxes']}" if cov[k]["recall"] is not None else f"{k} -"
        for k in BUCKETS
    ]
    return f"  {label:<34} " + ", ".join(parts)


def describe_changes(cfg: Config, fit: Fit) -> list[str]:
    old, new = cfg.model, fit.model
    lines = []
    if new.input_size != old.input_size:
        lines.append(f"model.input_size: {old.input_size} -> {new.input_size}")
        if new.extras != old.extras:
            assert old.extras is not None and new.extras is not None  # set by ModelConfig.__post_init__
            lines.append(
                f"model.extras: {len(old.extras)} -> {len(new.extras)} blocks "
                f"(feature levels {2 + len(old.extras)} -> {2 + len(new.extras)})"
            )
        if new.fc6_dilation != old.fc6_dilation:
            lines.append(f"model.fc6_dilation: {old.fc6_dilation} -> {new.fc6_dilation}")
    p = new.priors
    lines.append(f"model.priors: min_sizes {p.min_sizes}, max_sizes {p.max_sizes}, aspect_ratios {p.aspect_ratios}")
    return lines


def run_fit_priors(
    cfg: Config,
    raw: dict,
    out: Path,
    max_input: int | None = None,
    keep_input: bool = False,
    source: str = "the config",
) -> dict:
    """Fit the priors of ``cfg`` (loaded from ``raw``, the YAML dict with the overrides applied) to
    data.train, print the coverage, write the new config to ``out``. Returns ``{"before", "after"}``
    (coverage dicts of today's and the written config's priors) and the chosen ``fit``."""
    if cfg.model.init:
        raise ConfigError(
            f"model.init {cfg.model.init}: a fine-tuning run keeps the priors of its checkpoint (ssd train "
            "refuses other sizes); fit the priors of a config without model.init (model.init_backbone is fine)"
        )
    size = cfg.model.input_size
    assert size is not None  # set by ModelConfig.__post_init__
    max_input = size if keep_input else (max_input or 2 * size)
    if max_input < size:
        raise ConfigError(
            f"--max-input {max_input} is smaller than model.input_size {size}; give a larger size or --keep-input"
        )
    problems = Problems("skip")
    records, _ = index_dataset(cfg.data.train, problems, "data.train")
    problems.log_summary("data.train")
    norm = normalised_boxes(records)
    if not len(norm):
        raise DatasetError(
            f"data.train ({cfg.data.train.root or cfg.data.train.annotations}): no boxes to fit the priors to"
        )
    threshold = cfg.loss.iou_threshold
    today = build_ssd(cfg.model)
    fits = fit_input_and_priors(norm.double().numpy(), cfg.model, threshold, max_input)
    fit = choose(fits)
    data = fitted_config_dict(raw, cfg, fit)
    new_cfg = from_dict(Config, data)  # what ssd train will load
    new_model = build_ssd(new_cfg.model)
    # the size buckets of every row count the same boxes: areas in pixels of today's input
    before = coverage_from_best_iou(norm, best_prior_iou(norm, today.priors), size, threshold)
    after = coverage_from_best_iou(norm, best_prior_iou(norm, new_model.priors), size, threshold)
    print(
        f"data.train: {len(norm)} boxes in {len(records)} images; prior coverage (best prior IoU >= {threshold}; "
        f"size buckets in pixels of the {size} px input)"
    )
    print(coverage_row(f"today (input {size}, {len(today.priors)} priors)", before))
    for f in fits[:-1] if fit is fits[-1] else []:
        print(
            f"  fitted at input {f.model.input_size:<4} {f.coverage:.1%} "
            f"(below {TARGET_COVERAGE:.0%}: sizes alone are not enough)"
        )
    print(coverage_row(f"fitted (input {fit.model.input_size}, {len(new_model.priors)} priors)", after))
    if fit.coverage < TARGET_COVERAGE:
        tried = f"at input {size}" if max_input == size else f"at inputs up to {max_input} px (--max-input)"
        print(f"  no fit reaches {TARGET_COVERAGE:.0%} {tried}; the best one is written")
    if fit.model.input_size != size:
        macs_before, macs_after = conv_macs_per_image(today), conv_macs_per_image(new_model)
        print(
            f"cost relative to today: {len(new_model.priors)} priors vs {len(today.priors)} "
            f"({len(new_model.priors) / len(today.priors):.2f}x), {macs_after / 1e9:.3f} vs {macs_before / 1e9:.3f} "
            f"GMAC per image ({macs_after / macs_before:.2f}x)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# written by `ssd data fit-priors {source}`: prior coverage of data.train "
        f"{before['all']['recall']:.1%} -> {after['all']['recall']:.1%}\n"
    )
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    for line in describe_changes(cfg, fit):
        print(f"  {line}")
    print(f"wrote {out}")
    return {"before": before, "after": after, "fit": fit}


def run(args: argparse.Namespace) -> int:
    raw = read_yaml_dict(args.config, args.overrides)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(args.config).with_name(f"{Path(args.config).stem}_fitted.yaml")
    run_fit_priors(cfg, raw, out, args.max_input, args.keep_input, " ".join([args.config, *args.overrides]))
    return 0
