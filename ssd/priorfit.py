"""Prior coverage and prior fitting: how well a model's default boxes can match a dataset's boxes,
and the prior sizes (and, if sizes alone cannot do it, the input size) that match them best.

It joins the data and the model, so it sits above both (``ssd/data`` never imports the network):
``ssd data check`` gets its coverage here, ``ssd data fit-priors`` its search.

Coverage (the definition ``ssd data check`` reports): the fraction of the non-difficult boxes whose
best prior has IoU >= the matching threshold after the eval resize to the square input, overall
and per COCO size bucket (area in input pixels). Boxes are ``xyxy`` normalised to [0, 1] here.

The search is exact and fast because all priors of one (level, shape) sit on a regular grid of
centres: a fixed-size prior overlaps a box most at the grid centre nearest to the box centre
(the overlap in x and y each shrinks with the centre distance), so a box's best IoU on a level is
one IoU per shape there, not one per prior. Sizes are fitted by coordinate search over a
geometric grid of pixel sizes (2^(1/8) apart), levels kept in order (a deeper level never gets
smaller priors than a shallower one) and no level's priors smaller than its stride (unless the
config already has them so), from two starts: today's sizes and box-size quantiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from ssd.config import Config, ModelConfig
from ssd.data.records import ImageRecord
from ssd.model.priors import resolve_prior_layout
from ssd.model.resize import model_feature_sizes
from ssd.ops.boxes import box_iou, cxcywh_to_xyxy

# COCO's size buckets (area in pixels of the network input, i.e. after the eval resize)
SMALL_AREA, MEDIUM_AREA = 32**2, 96**2
TARGET_COVERAGE = 0.9  # below it `ssd data check` warns, and `fit-priors` tries larger inputs
SIZE_GRID_RATIO = 2 ** (1 / 8)  # candidate prior sizes: a geometric grid, ~9% apart
RATIO_CANDIDATES = (2.0, 3.0, 4.0)  # aspect ratios fit-priors may add to a level
MIN_RATIO_GAIN = 0.01  # an added aspect ratio must match >= 1% more of the boxes
MAX_ROUNDS = 12


# --- coverage (ssd data check) ----------------------------------------------------------------


def normalised_boxes(records: list[ImageRecord]) -> torch.Tensor:
    """The non-difficult boxes of ``records``, ``Tensor[N, 4]`` xyxy normalised by their image's size."""
    boxes = [r.boxes[~r.difficult] / np.array([r.width, r.height] * 2, np.float32) for r in records]
    return torch.from_numpy(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))


def prior_coverage(
    records: list[ImageRecord], priors_cxcywh: torch.Tensor, input_size: int, iou_threshold: float = 0.5
) -> dict:
    """Best possible recall of the priors: the fraction of (non-difficult) boxes whose best prior has
    IoU >= ``iou_threshold`` after the eval resize to ``input_size`` squared, overall and per size."""
    norm = normalised_boxes(records)
    return coverage_from_best_iou(norm, best_prior_iou(norm, priors_cxcywh), input_size, iou_threshold)


def best_prior_iou(norm: torch.Tensor, priors_cxcywh: torch.Tensor) -> torch.Tensor:
    """Each box's best IoU with any prior, ``Tensor[N]``, by brute force (boxes ``[N, 4]`` normalised xyxy)."""
    priors_xyxy = cxcywh_to_xyxy(priors_cxcywh.float())
    return (
        torch.cat([box_iou(chunk, priors_xyxy).max(dim=1).values for chunk in norm.split(2048)])
        if len(norm)
        else torch.zeros(0)
    )


def coverage_from_best_iou(norm: torch.Tensor, best: torch.Tensor, input_size: int, iou_threshold: float) -> dict:
    """The coverage dict of boxes ``norm`` (``Tensor[N, 4]`` normalised xyxy) whose best prior IoUs are ``best``."""
    wh = (norm[:, 2:] - norm[:, :2]) * input_size
    area = wh.prod(dim=1)
    matched = best >= iou_threshold
    result: dict[str, Any] = {
        "iou_threshold": iou_threshold,
        "input_size": input_size,
        "num_boxes": len(norm),
        "best_iou_mean": float(best.mean()) if len(best) else math.nan,
    }
    buckets = {
        "all": torch.ones_like(matched),
        "small": area < SMALL_AREA,
        "medium": (area >= SMALL_AREA) & (area < MEDIUM_AREA),
        "large": area >= MEDIUM_AREA,
    }
    for name, mask in buckets.items():
        n = int(mask.sum())
        result[name] = {"boxes": n, "recall": float(matched[mask].float().mean()) if n else None}
    miss = ~matched
    if miss.any():
        side = area[miss].sqrt()
        aspect = wh[miss, 0] / wh[miss, 1].clamp(min=1e-6)
        aspect = torch.maximum(aspect, 1 / aspect.clamp(min=1e-6))
        result["unmatched_median_side_px"] = float(side.median())
        result["unmatched_median_aspect"] = float(aspect.median())
    return result


def coverage_advice(cov: dict, smallest_prior_px: float, input_size: int) -> str | None:
    """A concrete suggestion when fewer than 90% of the boxes can be matched, else None."""
    recall = cov["all"]["recall"]
    if recall is None or recall >= TARGET_COVERAGE:
        return None
    side, aspect = cov.get("unmatched_median_side_px", 0.0), cov.get("unmatched_median_aspect", 1.0)
    text = f"only {recall:.1%} of the boxes have a prior with IoU >= {cov['iou_threshold']}; "
    if side < smallest_prior_px:
        text += (
            f"the unmatched boxes are small (median side {side:.0f} px at input {input_size}) while the smallest prior "
            f"is {smallest_prior_px:.0f} px: lower model.priors.min_sizes (start near {max(4.0, side):.0f} px) "
            "or raise model.input_size"
        )
    elif aspect > 2.5:
        text += (
            f"the unmatched boxes are elongated (median aspect {aspect:.1f}): "
            "add aspect ratios (e.g. 3, 4) to model.priors.aspect_ratios"
        )
    else:
        text += (
            f"median unmatched side {side:.0f} px, aspect {aspect:.1f}: "
            "adjust model.priors sizes or aspect ratios to the data"
        )
    return text + "; `ssd data fit-priors` chooses them"


def coverage_function(cfg: Config) -> Callable[[list[ImageRecord]], dict]:
    """``records -> coverage dict`` (with ``advice``) for the priors of the model ``cfg`` describes (built once)."""
    from ssd.model import build_ssd

    model = build_ssd(cfg.model)
    input_size = cfg.model.input_size
    assert input_size is not None  # set by ModelConfig.__post_init__
    smallest = min(resolve_prior_layout(cfg.model, len(model.head.loc))["min_scales"]) * input_size

    def coverage(records: list[ImageRecord]) -> dict:
        cov = prior_coverage(records, model.priors, input_size, cfg.loss.iou_threshold)
        cov["advice"] = coverage_advice(cov, smallest, input_size)
        return cov

    return coverage


# --- the prior grid: a box's best IoU per level, without enumerating priors --------------------


@dataclass
class PriorGrid:
    """Where a model's priors sit at one input size: per level the feature map ``(h, w)`` and the
    centre strides as fractions of the input; ``clip`` as :func:`ssd.model.priors.make_priors`."""

    input_size: int
    feature_sizes: list[tuple[int, int]]
    steps: list[tuple[float, float]]  # (y, x) per level, normalised
    clip: str

    @classmethod
    def of(cls, cfg: ModelConfig) -> PriorGrid:
        sizes = model_feature_sizes(cfg)
        # the centres do not depend on the sizes: derive those, so a config whose sizes are for another
        # level count (a larger input has more levels) still gives its grid
        derived = dataclasses.replace(cfg.priors, scales=None, min_sizes=None, max_sizes=None, aspect_ratios=None)
        layout = resolve_prior_layout(dataclasses.replace(cfg, priors=derived), len(sizes))
        size = cfg.input_size
        assert size is not None  # set by ModelConfig.__post_init__
        steps = [
            (1 / h, 1 / w) if layout["steps"] is None else (s / size, s / size)
            for (h, w), s in zip(sizes, layout["steps"] or [None] * len(sizes), strict=True)
        ]
        return cls(size, sizes, steps, layout["clip"])


@dataclass
class PriorSizes:
    """Per level: the min and max size in input pixels (squares ``min`` and ``sqrt(min * max)``) and aspect ratios."""

    min_px: list[float]
    max_px: list[float]
    aspect_ratios: list[list[float]]

    @classmethod
    def of(cls, cfg: ModelConfig, num_levels: int) -> PriorSizes:
        layout = resolve_prior_layout(cfg, num_levels)
        size = cfg.input_size
        return cls(
            [s * size for s in layout["min_scales"]],
            [s * size for s in layout["max_scales"]],
            [list(r) for r in layout["aspect_ratios"]],
        )


def level_shapes(min_px: ArrayLike, max_px: ArrayLike, ratios: list[float], input_size: int) -> np.ndarray:
    """Prior ``(w, h)`` normalised, ``[G, A, 2]`` for ``G`` candidate (min, max) pairs, in make_priors' order."""
    s, s2 = np.asarray(min_px, np.float64) / input_size, np.sqrt(np.asarray(min_px) * np.asarray(max_px)) / input_size
    wh = [(s, s), (s2, s2)]
    for r in ratios:
        wh += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
    return np.stack([np.stack(p, -1) for p in wh], 1)  # [G, A, 2]


def level_best_iou(boxes: np.ndarray, grid: PriorGrid, level: int, shapes: np.ndarray) -> np.ndarray:
    """Each box's best IoU with the priors of ``level`` for each candidate, ``[N, G]``.

    ``boxes`` ``[N, 4]`` normalised xyxy (float64); ``shapes`` ``[G, A, 2]`` from :func:`level_shapes`.
    The best prior of a shape is the one at the grid centre nearest to the box centre.
    """
    (fh, fw), (sy, sx) = grid.feature_sizes[level], grid.steps[level]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    pcx = (np.clip(np.floor(cx / sx), 0, fw - 1) + 0.5) * sx  # [N]
    pcy = (np.clip(np.floor(cy / sy), 0, fh - 1) + 0.5) * sy
    wh = shapes
    if grid.clip == "corners":  # make_priors clamps all four cxcywh values to [0, 1]
        pcx, pcy, wh = np.clip(pcx, 0, 1), np.clip(pcy, 0, 1), np.clip(wh, 0, 1)
    elif grid.clip == "wh":
        wh = np.clip(wh, 0, 1)
    pw, ph = wh[None, ..., 0], wh[None, ..., 1]  # [1, G, A]
    ix = np.minimum(boxes[:, 2, None, None], pcx[:, None, None] + pw / 2) - np.maximum(
        boxes[:, 0, None, None], pcx[:, None, None] - pw / 2
    )
    iy = np.minimum(boxes[:, 3, None, None], pcy[:, None, None] + ph / 2) - np.maximum(
        boxes[:, 1, None, None], pcy[:, None, None] - ph / 2
    )
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)  # [N, G, A]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None, None]
    return (inter / (area + pw * ph - inter)).max(axis=2)


def best_iou(boxes: np.ndarray, grid: PriorGrid, sizes: PriorSizes) -> np.ndarray:
    """Each box's best IoU over all priors, ``[L, N]`` per level (the max over levels is the coverage's)."""
    return np.stack(
        [
            level_best_iou(
                boxes,
                grid,
                k,
                level_shapes([sizes.min_px[k]], [sizes.max_px[k]], sizes.aspect_ratios[k], grid.input_size),
            )[:, 0]
            for k in range(len(grid.feature_sizes))
        ]
    )


# --- fitting ------------------------------------------------------------------------------------


def score(best: np.ndarray, threshold: float) -> tuple[int, float]:
    """What the search maximises: boxes matched, then the sum of best IoUs (moves sizes along plateaus)."""
    return int((best >= threshold).sum()), float(best.sum())


def size_grid(boxes: np.ndarray, input_size: int) -> np.ndarray:
    """Candidate prior sizes in input pixels: 2^(1/8) apart, from half the smallest box side to 1.1 x the input."""
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * input_size
    lo = max(1.0, 0.5 * float(sides.min())) if len(sides) else 1.0
    hi = 1.1 * input_size
    return lo * SIZE_GRID_RATIO ** np.arange(math.ceil(math.log(hi / lo, SIZE_GRID_RATIO)) + 1)


def best_candidate(
    boxes: np.ndarray,
    grid: PriorGrid,
    k: int,
    mins: np.ndarray,
    maxs: np.ndarray,
    ratios: list[float],
    others: np.ndarray,
    threshold: float,
) -> tuple[int, tuple[int, float], np.ndarray]:
    """Of the candidate sizes ``(mins[g], maxs[g])`` of level ``k``, the one whose priors, with the best IoUs
    ``others`` of the other levels, match the most boxes: ``(g, its score, its level IoUs [N])``."""
    level = level_best_iou(boxes, grid, k, level_shapes(mins, maxs, ratios, grid.input_size))  # [N, G]
    total = np.maximum(others[:, None], level)
    matched, sums = (total >= threshold).sum(0), total.sum(0)
    g = max(range(len(mins)), key=lambda i: (matched[i], sums[i], -i))  # ties: the smaller size
    return g, (int(matched[g]), float(sums[g])), level[:, g]


def others_best(per_level: np.ndarray, k: int) -> np.ndarray:
    """The best IoU of each box on every level but ``k``, ``[N]``."""
    return np.delete(per_level, k, axis=0).max(0) if len(per_level) > 1 else np.zeros(per_level.shape[1])


def stride_floors(grid: PriorGrid, today: PriorSizes) -> list[float]:
    """The smallest min size each level may get, in input pixels: its stride (the distance between its
    prior centres), or today's size where the config already goes below that (SSD300's 264 px on the
    300 px step of its 1x1 map).

    Without it, small boxes make the search give the coarse maps priors of a few pixels: their centres
    fill gaps between the finer grids, which raises coverage, but it asks a 2x2 or 1x1 map to find and
    regress objects a fraction of one of its cells, and in training that cost more mAP than the
    coverage bought (docs/priorfit.md)."""
    return [min(max(sy, sx) * grid.input_size, m) for (sy, sx), m in zip(grid.steps, today.min_px, strict=True)]


def min_size_bounds(sizes: PriorSizes, k: int, floors: list[float]) -> tuple[float, float]:
    """Level ``k``'s min size stays between its neighbours' (a deeper level never gets smaller priors)
    and at least its floor (:func:`stride_floors`)."""
    low = max(sizes.min_px[k - 1] if k > 0 else 0.0, floors[k])
    return low, (sizes.min_px[k + 1] if k + 1 < len(sizes.min_px) else math.inf)


def floored(sizes: PriorSizes, floors: list[float]) -> PriorSizes:
    """``sizes`` with every min size raised to its floor (and to the level before it), max sizes kept >= min."""
    mins: list[float] = []
    for m, f in zip(sizes.min_px, floors, strict=True):
        mins.append(max(m, f, mins[-1] if mins else 0.0))
    return PriorSizes(
        mins, [max(a, m) for a, m in zip(sizes.max_px, mins, strict=True)], [list(r) for r in sizes.aspect_ratios]
    )


def fit_sizes(
    boxes: np.ndarray, grid: PriorGrid, start: PriorSizes, threshold: float, floors: list[float]
) -> tuple[PriorSizes, np.ndarray]:
    """Coordinate search from ``start``: each level's min, then max size, set to the grid value that
    matches the most boxes, until a round changes nothing. Keeps ``min_px`` non-decreasing over levels,
    at least ``floors`` and ``max_px >= min_px``. Returns the sizes and their per-level best IoUs ``[L, N]``."""
    candidates = size_grid(boxes, grid.input_size)
    sizes = floored(start, floors)
    per_level = best_iou(boxes, grid, sizes)
    current = score(per_level.max(0), threshold)
    for _ in range(MAX_ROUNDS):
        changed = False
        for k in range(len(grid.feature_sizes)):
            others = others_best(per_level, k)
            for which in ("min", "max"):
                low, high = min_size_bounds(sizes, k, floors) if which == "min" else (sizes.min_px[k], math.inf)
                cand = candidates[
                    (candidates >= low) & (candidates <= (min(high, sizes.max_px[k]) if which == "min" else high))
                ]
                if not len(cand):
                    continue
                mins = cand if which == "min" else np.full(len(cand), sizes.min_px[k])
                maxs = cand if which == "max" else np.full(len(cand), sizes.max_px[k])
                g, cand_score, level = best_candidate(
                    boxes, grid, k, mins, maxs, sizes.aspect_ratios[k], others, threshold
                )
                if cand_score > current:
                    current = cand_score
                    (sizes.min_px if which == "min" else sizes.max_px)[k] = float(cand[g])
                    per_level[k] = level
                    changed = True
        if not changed:
            break
    return sizes, per_level


def quantile_start(boxes: np.ndarray, grid: PriorGrid, aspect_ratios: list[list[float]]) -> PriorSizes:
    """Sizes from the data alone: level k spans the k-th of L equal-count groups of box sides."""
    sides = np.sort(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))) * grid.input_size
    levels = len(grid.feature_sizes)
    edges = (
        np.quantile(sides, np.linspace(0, 1, levels + 1))
        if len(sides)
        else np.linspace(0.1, 1, levels + 1) * grid.input_size
    )
    return PriorSizes([float(e) for e in edges[:-1]], [float(e) for e in edges[1:]], [list(r) for r in aspect_ratios])


def add_aspect_ratios(
    boxes: np.ndarray, grid: PriorGrid, sizes: PriorSizes, threshold: float, floors: list[float]
) -> PriorSizes:
    """Add the aspect ratio (of RATIO_CANDIDATES, to one level, with that level's min size refitted for it)
    that matches the most more boxes, while that is at least MIN_RATIO_GAIN of them; refit all sizes after each."""
    candidates = size_grid(boxes, grid.input_size)
    per_level = best_iou(boxes, grid, sizes)
    while True:
        base = score(per_level.max(0), threshold)[0]
        best_gain, best_choice = MIN_RATIO_GAIN * len(boxes), None
        for k in range(len(grid.feature_sizes)):
            low, high = min_size_bounds(sizes, k, floors)
            mins = candidates[(candidates >= low) & (candidates <= high)]
            for r in RATIO_CANDIDATES:
                if r in sizes.aspect_ratios[k] or not len(mins):
                    continue
                ratios = [*sizes.aspect_ratios[k], r]
                g, (matched, _), _ = best_candidate(
                    boxes,
                    grid,
                    k,
                    mins,
                    np.maximum(mins, sizes.max_px[k]),
                    ratios,
                    others_best(per_level, k),
                    threshold,
                )
                if matched - base >= best_gain and (best_choice is None or matched - base > best_gain):
                    best_gain, best_choice = matched - base, (k, ratios, float(mins[g]))
        if best_choice is None:
            return sizes
        k, ratios, min_px = best_choice
        trial = PriorSizes(list(sizes.min_px), list(sizes.max_px), [list(r) for r in sizes.aspect_ratios])
        trial.min_px[k], trial.max_px[k], trial.aspect_ratios[k] = min_px, max(min_px, sizes.max_px[k]), ratios
        sizes, per_level = fit_sizes(boxes, grid, trial, threshold, floors)


def fit_priors(boxes: np.ndarray, grid: PriorGrid, today: PriorSizes, threshold: float) -> tuple[PriorSizes, float]:
    """The prior sizes (and added aspect ratios) that maximise coverage on ``grid``; returns them and the coverage.
    Never worse than ``today`` where today's sizes respect the stride floors: it is one of the two starts."""
    floors = stride_floors(grid, today)
    starts = (today, quantile_start(boxes, grid, today.aspect_ratios))
    results = [fit_sizes(boxes, grid, start, threshold, floors) for start in starts]
    sizes, per_level = max(results, key=lambda r: score(r[1].max(0), threshold))
    if len(boxes) and (per_level.max(0) >= threshold).mean() < TARGET_COVERAGE:
        sizes = add_aspect_ratios(boxes, grid, sizes, threshold, floors)
        per_level = best_iou(boxes, grid, sizes)
    covered = float((per_level.max(0) >= threshold).mean()) if len(boxes) else 0.0
    return sizes, covered


# --- the input size -------------------------------------------------------------------------------


@dataclass
class Fit:
    """The fitted priors at one input size: ``model`` is the model config that ssd train builds."""

    model: ModelConfig
    sizes: PriorSizes
    coverage: float  # from the prior grid; equal to prior_coverage of model's priors

    @property
    def num_priors(self) -> int:
        sizes = model_feature_sizes(self.model)
        return sum(h * w * (2 + 2 * len(r)) for (h, w), r in zip(sizes, self.sizes.aspect_ratios, strict=True))


def with_priors(cfg: ModelConfig, sizes: PriorSizes) -> ModelConfig:
    """``cfg`` with these prior sizes (pixels, rounded to 0.01) and aspect ratios."""
    priors = dataclasses.replace(
        cfg.priors,
        scales=None,
        min_sizes=[round(v, 2) for v in sizes.min_px],
        max_sizes=[round(v, 2) for v in sizes.max_px],
        aspect_ratios=sizes.aspect_ratios,
    )
    return dataclasses.replace(cfg, priors=priors)


def rescaled(sizes: PriorSizes, from_size: int, grid: PriorGrid) -> PriorSizes:
    """``sizes`` as the same fractions of a new input, interpolated (in log size) onto the grid's level count."""
    old, new = len(sizes.min_px), len(grid.feature_sizes)
    at = np.linspace(0, old - 1, new)

    def move(values: list[float]) -> list[float]:
        fractions = np.log(np.asarray(values) / from_size)
        return [float(v) for v in np.exp(np.interp(at, np.arange(old), fractions)) * grid.input_size]

    return PriorSizes(move(sizes.min_px), move(sizes.max_px), [list(sizes.aspect_ratios[round(a)]) for a in at])


def candidate_input_sizes(input_size: int, max_input: int) -> list[int]:
    """Today's size, then the multiples of 32 above it up to ``max_input``: at multiples of 32 the
    strides of the first levels (8, 16, 32) divide the input, so prior centres sit on their cells."""
    return [input_size] + list(range((input_size // 32 + 1) * 32, max_input + 1, 32))


def fit_input_and_priors(
    boxes: np.ndarray,
    cfg: ModelConfig,
    threshold: float,
    max_input: int | None = None,
    target: float = TARGET_COVERAGE,
    log: Callable[[str], None] = lambda _: None,
) -> list[Fit]:
    """Fit the priors at today's input size and, while the coverage stays below ``target``, at the
    larger sizes of :func:`candidate_input_sizes` up to ``max_input`` (None: today's only). Returns
    every fit made, in order; the last one reached ``target`` if any did."""
    from ssd.model.resize import config_at_input_size

    assert cfg.input_size is not None  # set by ModelConfig.__post_init__
    today = PriorSizes.of(cfg, len(PriorGrid.of(cfg).feature_sizes))
    fits = []
    for size in candidate_input_sizes(cfg.input_size, max_input or cfg.input_size):
        model = config_at_input_size(cfg, size)
        model_grid = PriorGrid.of(model)
        sizes, covered = fit_priors(boxes, model_grid, rescaled(today, cfg.input_size, model_grid), threshold)
        fits.append(Fit(with_priors(model, sizes), sizes, covered))
        log(f"input {size}: coverage {covered:.1%} with fitted priors")
        if covered >= target:
            break
    return fits
