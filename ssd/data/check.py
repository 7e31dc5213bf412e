"""``ssd data check``: validate a whole dataset and measure how well the model's priors cover its boxes."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ssd.config import Config, DatasetConfig
from ssd.data.dataset import index_dataset, read_image
from ssd.data.records import DatasetError, ImageRecord, Problems
from ssd.ops.boxes import box_iou, cxcywh_to_xyxy

# COCO's size buckets (area in pixels of the network input, i.e. after the eval resize)
SMALL_AREA, MEDIUM_AREA = 32**2, 96**2


@dataclass
class CheckReport:
    name: str
    num_images: int = 0
    objects: Counter = field(default_factory=Counter)
    difficult: int = 0
    empty_images: int = 0
    problems: Problems = field(default_factory=lambda: Problems("skip"))
    coverage: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def prior_coverage(records: list[ImageRecord], priors_cxcywh: torch.Tensor, input_size: int, iou_threshold: float = 0.5) -> dict:
    """Best possible recall of the priors: the fraction of (non-difficult) boxes whose best prior has
    IoU >= ``iou_threshold`` after the eval resize to ``input_size`` squared, overall and per size."""
    boxes = [r.boxes[~r.difficult] / np.array([r.width, r.height] * 2, np.float32) for r in records]
    norm = torch.from_numpy(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))
    priors_xyxy = cxcywh_to_xyxy(priors_cxcywh.float())
    best = torch.cat([box_iou(chunk, priors_xyxy).max(dim=1).values for chunk in norm.split(2048)]) if len(norm) else torch.zeros(0)
    wh = (norm[:, 2:] - norm[:, :2]) * input_size
    area = wh.prod(dim=1)
    matched = best >= iou_threshold
    result = {"iou_threshold": iou_threshold, "num_boxes": len(norm), "best_iou_mean": float(best.mean()) if len(best) else math.nan}
    buckets = {"all": torch.ones_like(matched), "small": area < SMALL_AREA,
               "medium": (area >= SMALL_AREA) & (area < MEDIUM_AREA), "large": area >= MEDIUM_AREA}  # fmt: skip
    for name, mask in buckets.items():
        n = int(mask.sum())
        result[name] = {"boxes": n, "recall": float(matched[mask].float().mean()) if n else None}
    miss = ~matched
    if miss.any():
        side = area[miss].sqrt()
        aspect = (wh[miss, 0] / wh[miss, 1].clamp(min=1e-6))
        aspect = torch.maximum(aspect, 1 / aspect.clamp(min=1e-6))
        result["unmatched_median_side_px"] = float(side.median())
        result["unmatched_median_aspect"] = float(aspect.median())
    return result


def coverage_advice(cov: dict, smallest_prior_px: float, input_size: int) -> str | None:
    """A concrete suggestion when fewer than 90% of the boxes can be matched, else None."""
    recall = cov["all"]["recall"]
    if recall is None or recall >= 0.9:
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
        text += f"the unmatched boxes are elongated (median aspect {aspect:.1f}): add aspect ratios (e.g. 3, 4) to model.priors.aspect_ratios"
    else:
        text += f"median unmatched side {side:.0f} px, aspect {aspect:.1f}: adjust model.priors sizes or aspect ratios to the data"
    return text


def check_split(cfg: DatasetConfig, name: str, decode_images: bool = True) -> tuple[CheckReport, list[ImageRecord], list[str]]:
    """Index one split collecting every problem (never raising on data), optionally decoding every image."""
    report = CheckReport(name)
    records, classes = index_dataset(cfg, report.problems, name)
    report.num_images = len(records)
    for rec in records:
        for label, diff in zip(rec.labels, rec.difficult):
            report.objects[classes[label - 1]] += 1
            report.difficult += int(diff)
        report.empty_images += int(len(rec.labels) == 0)
        if decode_images:
            try:
                image = read_image(rec.path)
            except DatasetError as e:
                report.problems.report("unreadable image", rec.path, str(e).removeprefix(f"{rec.path}: "))
                continue
            if image.shape[1] != rec.width or image.shape[0] != rec.height:
                report.problems.report(
                    "size mismatch", rec.path, f"image is {image.shape[1]}x{image.shape[0]}, annotation says {rec.width}x{rec.height}"
                )
    return report, records, classes


def check_dataset(cfg: Config, splits: list[str], decode_images: bool = True) -> list[CheckReport]:
    from ssd.model import build_ssd
    from ssd.model.priors import resolve_prior_layout

    model = build_ssd(cfg.model)
    smallest = min(resolve_prior_layout(cfg.model, len(model.head.loc))["min_scales"]) * cfg.model.input_size
    reports = []
    for split in splits:
        report, records, classes = check_split(getattr(cfg.data, split), f"data.{split}", decode_images)
        if len(classes) + 1 != cfg.model.num_classes:
            report.problems.report("class count", f"data.{split}",
                                   f"{len(classes)} classes + background != model.num_classes {cfg.model.num_classes}")  # fmt: skip
        report.coverage = prior_coverage(records, model.priors, cfg.model.input_size, cfg.loss.iou_threshold)
        report.coverage["advice"] = coverage_advice(report.coverage, smallest, cfg.model.input_size)
        reports.append(report)
    return reports


def format_report(report: CheckReport) -> str:
    lines = [f"{report.name}: {report.num_images} images, {sum(report.objects.values())} objects "
             f"({report.difficult} difficult/crowd), {report.empty_images} images without objects"]  # fmt: skip
    width = max([len(k) for k in report.objects] + [5])
    for name, n in sorted(report.objects.items()):
        lines.append(f"  {name:<{width}} {n:>7}")
    cov = report.coverage
    if cov:
        parts = [f"{k} {cov[k]['recall']:.1%} of {cov[k]['boxes']}" for k in ("all", "small", "medium", "large") if cov[k]["recall"] is not None]
        lines.append(f"  prior coverage (best prior IoU >= {cov['iou_threshold']}): " + ", ".join(parts))
        if cov.get("advice"):
            lines.append(f"  WARNING: {cov['advice']}")
    if report.problems or report.problems.fixed:
        lines.append("  problems:")
        lines += [f"    {line}" for line in report.problems.summary()]
    else:
        lines.append("  no problems found")
    return "\n".join(lines)
