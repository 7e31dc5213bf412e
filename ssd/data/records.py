"""What a dataset index holds per image, and how problems in the data are reported.

Coordinates: ``boxes`` are ``xyxy`` float32 in continuous 0-based pixel-edge coordinates of the
image (a box covering pixel columns 0..9 is x1 = 0, x2 = 10). VOC XML stores 1-based inclusive
pixel indices, so ``(xmin, ymin, xmax, ymax)`` converts to ``(xmin - 1, ymin - 1, xmax, ymax)``:
the width is ``xmax - xmin + 1`` as the VOC devkit counts it, and the box lands on the same pixels
the annotator drew. COCO ``bbox`` ``[x, y, w, h]`` is already continuous: ``(x, y, x + w, y + h)``.
``source_boxes`` keep the file's own numbers (VOC XML values) for evaluation in the file's frame.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A problem in a dataset file; the message names the file and what is wrong."""


@dataclass
class ImageRecord:
    image_id: str  # VOC: the id from the split file; COCO: str(image id)
    path: str
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float32 xyxy, continuous pixels
    labels: np.ndarray  # [N] int64, 1..C-1
    difficult: np.ndarray  # [N] bool: VOC difficult / COCO iscrowd; excluded from training by default
    source_boxes: np.ndarray | None = None  # [N, 4] float64 as written in the annotation file
    coco_id: int | None = None
    orientation: int = 1  # the EXIF orientation to apply when decoding (orientation.py); 1: as stored

    @staticmethod
    def empty_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)


@dataclass
class Problems:
    """Collects data problems under the ``raise`` / ``skip`` policy.

    ``raise``: the first problem raises :class:`DatasetError`. ``skip``: problems are counted by
    kind and kept for a summary. ``fixed`` counts silent-looking repairs that are always applied
    and always counted (degenerate boxes dropped, boxes clipped to the image). ``notes`` counts what is
    worth knowing but needs no repair (how an EXIF-rotated image is read). ``examples`` holds, per
    kind, one line for every problem, repaired file and noted file, each naming its file.
    """

    policy: str = "raise"
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    fixed: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    # kind -> (file, boxes) of the last line
    _last_fix: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)

    def report(self, kind: str, where: str, message: str) -> None:
        text = f"{where}: {message}"
        if self.policy == "raise":
            raise DatasetError(text)
        self.counts[kind] += 1
        self.examples.setdefault(kind, []).append(text)

    def fix(self, kind: str, where: str, n: int = 1) -> None:
        self.fixed[kind] += n
        entries = self.examples.setdefault(kind, [])
        last_where, last_n = self._last_fix.get(kind, (None, 0))
        if last_where == where:  # another repair in the same file (one call per object): one line per file
            n += last_n
            entries.pop()
        self._last_fix[kind] = (where, n)
        entries.append(f"{where}: {n} box{'es' if n > 1 else ''}")

    def note(self, kind: str, where: str) -> None:
        self.notes[kind] += 1
        self.examples.setdefault(kind, []).append(where)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def summary(self, every: bool = False) -> list[str]:
        """One line per kind naming its first file, or with ``every`` a line per kind and one per problem."""
        kinds = [(kind, n, "") for kind, n in sorted(self.counts.items())]
        kinds += [(kind, n, " (repaired)") for kind, n in sorted(self.fixed.items())]
        return self._lines(kinds, every)

    def note_summary(self, every: bool = False) -> list[str]:
        """:meth:`summary` of the notes."""
        return self._lines([(kind, n, "") for kind, n in sorted(self.notes.items())], every)

    def _lines(self, kinds: list[tuple[str, int, str]], every: bool) -> list[str]:
        lines = []
        for kind, n, repaired in kinds:
            entries = self.examples[kind]
            if every:
                lines.append(f"{n} x {kind}{repaired}:")
                lines += [f"  {entry}" for entry in entries]
            else:
                more = f" (and {len(entries) - 1} more)" if len(entries) > 1 else ""
                lines.append(f"{n} x {kind}{repaired}, e.g. {entries[0]}{more}")
        return lines

    def log_summary(self, what: str) -> None:
        for line in self.summary():
            log.warning("%s: %s", what, line)
        for line in self.note_summary():
            log.info("%s: %s", what, line)


# A box reaching further past the image than this is not an annotator's overshoot but a wrong label (another
# image's size, swapped x/y, absolute vs normalised): max(FAR_PX, FAR_FRACTION x the side) on either axis.
FAR_PX = 4.0
FAR_FRACTION = 0.02


def boxes_per_class(records: list[ImageRecord], classes: list[str]) -> dict[str, int]:
    """Each class's boxes that training learns from (difficult / crowd left out), in ``classes`` order."""
    counts: Counter[str] = Counter()
    for rec in records:
        counts.update(classes[label - 1] for label in rec.labels[~rec.difficult])
    return {name: counts[name] for name in classes}


def sanitize_boxes(
    boxes: np.ndarray, width: int, height: int, problems: Problems, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image; return ``(clipped boxes, keep mask)``. The input is not modified.

    Degenerate boxes (x2 <= x1 or y2 <= y1) and boxes entirely outside the image are dropped,
    boxes crossing the border clipped; each repair is counted in ``problems.fixed`` with the file,
    never silent. Non-finite coordinates, and a box reaching more than ``max(FAR_PX, FAR_FRACTION x the
    side)`` past the image ("likely wrong label"), are reported problems (and dropped under ``skip``).
    """
    if len(boxes) == 0:
        return boxes.copy(), np.zeros(0, bool)
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        problems.report("non-finite box", where, f"{int((~finite).sum())} box(es) with non-finite coordinates")
    safe = np.where(finite[:, None], boxes, 0)
    clipped = safe.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    valid = finite & (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
    past = np.stack([-safe[:, 0], -safe[:, 1], safe[:, 2] - width, safe[:, 3] - height], axis=1)  # [N, 4] px
    limits = np.maximum(FAR_PX, FAR_FRACTION * np.array([width, height, width, height], np.float64))
    far = valid & (past > limits).any(axis=1)
    for i in np.flatnonzero(far):
        problems.report(
            "box far outside the image (likely wrong label)",
            where,
            f"box {[round(float(v), 1) for v in safe[i]]} reaches {past[i].max():.0f} px past the {width}x{height} "
            f"image (more than max({FAR_PX:g} px, {FAR_FRACTION:.0%} of the side): clipping would invent a box)",
        )
    keep = valid & ~far & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = keep & (np.abs(clipped - safe) > 1e-3).any(axis=1)
    for kind, mask in (
        ("degenerate box dropped (x2 <= x1 or y2 <= y1)", finite & ~valid),
        ("box outside the image dropped", valid & ~far & ~keep),
        ("box crossing the image border clipped", moved),
    ):
        if mask.any():
            problems.fix(kind, where, int(mask.sum()))
    return clipped, keep
