"""Drawing detections on images (demo, predict)."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour per class (golden-ratio hue steps)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    score_threshold: float = 0.3,
) -> np.ndarray:
    """A copy of RGB ``image`` with boxes and ``name score`` labels (on a filled tab, readable on any background).

    Drawn in increasing score order, so where boxes or tabs overlap the highest-scored one is on top.
    """
    out = np.ascontiguousarray(image.copy())
    scale = max(0.35, min(out.shape[:2]) / 800)
    thick = max(2, int(round(scale * 3)))
    scores = np.asarray(scores, dtype=np.float64)
    for i in np.argsort(scores, kind="stable"):
        box, score, label = boxes[i], scores[i], labels[i]
        if score < score_threshold:
            continue
        color = class_color(int(label))
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)  # axis-aligned: anti-aliasing would only pale a thin edge
        name = names[int(label) - 1] if 0 < int(label) <= len(names) else str(int(label))
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2
        tx = max(0, min(x1, out.shape[1] - tw - 3))  # keep the tab inside the picture at the right edge
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty + 1), color, -1)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        cv2.putText(
            out,
            text,
            (tx + 1, ty - base + 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0) if luminance > 140 else (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return out
