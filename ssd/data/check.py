"""``ssd data check``: validate a whole dataset (files, boxes, classes). How well a model's priors cover
its boxes is measured in :mod:`ssd.priorfit` (it needs the network; this package never imports it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ssd.config import Config, DatasetConfig
from ssd.data.dataset import index_dataset, read_image
from ssd.data.records import DatasetError, ImageRecord, Problems


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


def check_split(
    cfg: DatasetConfig, name: str, decode_images: bool = True
) -> tuple[CheckReport, list[ImageRecord], list[str]]:
    """Index one split collecting every problem (never raising on data), optionally decoding every image."""
    report = CheckReport(name)
    records, classes = index_dataset(cfg, report.problems, name)
    report.num_images = len(records)
    for rec in records:
        for label, diff in zip(rec.labels, rec.difficult, strict=True):
            report.objects[classes[label - 1]] += 1
            report.difficult += int(diff)
        report.empty_images += int(len(rec.labels) == 0)
        if decode_images:
            try:
                image = read_image(rec.path, rec.orientation)
            except DatasetError as e:
                report.problems.report("unreadable image", rec.path, str(e).removeprefix(f"{rec.path}: "))
                continue
            if image.shape[1] != rec.width or image.shape[0] != rec.height:
                report.problems.report(
                    "size mismatch",
                    rec.path,
                    f"image is {image.shape[1]}x{image.shape[0]}, annotation says {rec.width}x{rec.height}",
                )
    return report, records, classes


def check_dataset(
    cfg: Config,
    splits: list[str],
    decode_images: bool = True,
    coverage: Callable[[list[ImageRecord]], dict] | None = None,
) -> list[CheckReport]:
    """Check each split; ``coverage`` (records -> the dict :func:`format_report` prints) measures the
    model's priors on each split's boxes: the caller brings it (:func:`ssd.priorfit.coverage_function`),
    so the data package never builds the network."""
    reports = []
    for split in splits:
        report, records, classes = check_split(getattr(cfg.data, split), f"data.{split}", decode_images)
        if len(classes) + 1 != cfg.model.num_classes:
            report.problems.report(
                "class count",
                f"data.{split}",
                f"{len(classes)} classes + background != model.num_classes {cfg.model.num_classes}",
            )
        if coverage is not None:
            report.coverage = coverage(records)
        reports.append(report)
    return reports


def format_report(report: CheckReport, every: bool = False) -> str:
    """The report as text; ``every`` lists every problem and repaired file instead of one per kind."""
    lines = [
        f"{report.name}: {report.num_images} images, {sum(report.objects.values())} objects "
        f"({report.difficult} difficult/crowd), {report.empty_images} images without objects"
    ]
    width = max([len(k) for k in report.objects] + [5])
    for name, n in sorted(report.objects.items()):
        lines.append(f"  {name:<{width}} {n:>7}")
    cov = report.coverage
    if cov:
        parts = [
            f"{k} {cov[k]['recall']:.1%} of {cov[k]['boxes']}"
            for k in ("all", "small", "medium", "large")
            if cov[k]["recall"] is not None
        ]
        if parts:  # no boxes of the listed classes: nothing to cover
            lines.append(f"  prior coverage (best prior IoU >= {cov['iou_threshold']}): " + ", ".join(parts))
        else:
            lines.append("  prior coverage: no boxes to measure it on")
        if cov.get("advice"):
            lines.append(f"  WARNING: {cov['advice']}")
    if report.problems or report.problems.fixed:
        lines.append("  problems:")
        lines += [f"    {line}" for line in report.problems.summary(every)]
    else:
        lines.append("  no problems found")
    if report.problems.notes:
        lines.append("  notes:")
        lines += [f"    {line}" for line in report.problems.note_summary(every)]
    return "\n".join(lines)
