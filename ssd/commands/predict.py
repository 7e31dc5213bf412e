"""``ssd predict``: a checkpoint's :class:`~ssd.inference.Detector` over image files, folders (searched
recursively) and videos; drawn copies under ``--out`` and the detections as JSON."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ssd.data.dataset import read_image
from ssd.data.voc import IMAGE_EXTENSIONS
from ssd.inference import Detector

log = logging.getLogger("ssd.inference")


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclass
class InputItem:
    """One thing to predict on: an image or video file, and where its drawn copy goes (relative to --out)."""

    path: Path
    kind: str  # "image" or "video"
    out_name: Path


def collect_inputs(inputs: Sequence[str]) -> tuple[list[InputItem], list[str]]:
    """Expand ``ssd predict``'s INPUTs into image / video items. Returns ``(items, problems)``.

    Files are videos by extension (:data:`VIDEO_EXTENSIONS`), images otherwise; folders are searched
    recursively for :data:`IMAGE_EXTENSIONS` (case-insensitive), in sorted order. Drawn copies go to
    ``--out/<file name>``; where two inputs share a file name, a folder's image keeps its path under
    ``--out/<folder name>/`` instead, and what still collides gets ``_1``, ``_2``, ... Missing paths
    and folders without images are problems (reported, counted as failed inputs).
    """
    found: list[tuple[Path, str, Path]] = []  # (file, kind, its path under the folder's name, or its name)
    problems: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not images:
                problems.append(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            found += [(p, "image", Path(path.resolve().name) / p.relative_to(path)) for p in images]
        elif path.is_file():
            found.append((path, "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image", Path(path.name)))
        else:
            problems.append(f"{path}: no such file or folder")
    names = Counter(p.name for p, _, _ in found)
    items, used = [], set()
    for path, kind, nested in found:
        out_name = Path(path.name) if names[path.name] == 1 else nested
        if kind == "video":
            out_name = out_name.with_suffix(".mp4")
        candidate, k = out_name, 1
        while candidate in used:  # the same name still: a.jpg, a_1.jpg
            candidate = out_name.with_name(f"{out_name.stem}_{k}{out_name.suffix}")
            k += 1
        used.add(candidate)
        items.append(InputItem(path, kind, candidate))
    return items, problems


def _try_read(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_image(str(path)), None
    except ValueError as e:  # DatasetError: unreadable, empty, truncated, not an image
        return None, str(e)


Decoded = tuple[InputItem, np.ndarray | None, str | None]  # (item, image or None, error or None)


def prefetch_images(items: Sequence[InputItem], batch_size: int) -> Iterator[list[Decoded]]:
    """Batches of ``(item, image or None, error or None)``; the next batch decodes in threads meanwhile."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(_try_read, it.path) for it in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            pending = [pool.submit(_try_read, it.path) for it in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield [(it, *f.result()) for it, f in zip(chunk, current, strict=True)]


def detection_entry(
    image: str, width: int, height: int, det: dict[str, Any], frame: int | None = None
) -> dict[str, Any]:
    """The JSON record of one image (docs/inference.md): boxes in original pixels."""
    entry: dict[str, Any] = {"image": image, "width": width, "height": height}
    if frame is not None:
        entry["frame"] = frame
    entry["detections"] = [
        {"box": [float(v) for v in box], "score": float(score), "label": int(label), "name": name}
        for box, score, label, name in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), det["names"], strict=True
        )
    ]
    return entry


def draw(image: np.ndarray, det: dict[str, Any], classes: list[str]) -> np.ndarray:
    from ssd.visualize import draw_detections

    boxes, scores, labels = det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy()
    return draw_detections(image, boxes, scores, labels, classes, score_threshold=0.0)


def open_video_writer(path: Path, fps: float, size_wh: tuple[int, int]) -> tuple[cv2.VideoWriter, Path]:
    """An mp4v ``.mp4`` writer, else MJPG ``.avi`` (OpenCV builds differ in their encoders)."""
    for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        out = path.with_suffix(suffix)
        writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*fourcc), fps, size_wh)
        if writer.isOpened():
            return writer, out
        writer.release()
    raise OSError(f"{path}: OpenCV cannot write video here (neither mp4v nor MJPG)")


class Predictor:
    """``ssd predict``'s loop: images in prefetched batches, then videos frame batch by frame batch."""

    def __init__(self, detector: Detector, out_dir: Path | None, progress: tqdm) -> None:
        self.detector, self.out_dir, self.progress = detector, out_dir, progress
        self.entries: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.num_detections = 0

    def fail(self, message: str) -> None:
        self.failed.append(message)
        tqdm.write(f"WARNING skipped {message}", file=sys.stderr)

    def record(self, name: str, image: np.ndarray, det: dict[str, Any], frame: int | None = None) -> None:
        h, w = image.shape[:2]
        self.entries.append(detection_entry(name, w, h, det, frame))
        self.num_detections += len(det["scores"])

    def images(self, items: list[InputItem]) -> None:
        for batch in prefetch_images(items, self.detector.batch_size):
            for _, _, error in batch:
                if error is not None:
                    self.fail(error)
            good = [(item, image) for item, image, _ in batch if image is not None]  # image None <=> error
            for (item, image), det in zip(good, self.detector.predict_batch([image for _, image in good]), strict=True):
                self.record(str(item.path), image, det)
                if self.out_dir is not None:
                    out = self.out_dir / item.out_name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    if not cv2.imwrite(
                        str(out), cv2.cvtColor(draw(image, det, self.detector.classes), cv2.COLOR_RGB2BGR)
                    ):
                        self.fail(f"{item.path}: cannot write the drawn image to {out}")
            self.progress.update(len(batch))

    def video(self, item: InputItem) -> None:
        cap = cv2.VideoCapture(str(item.path))
        if not cap.isOpened():
            self.fail(f"{item.path}: OpenCV cannot open this video")
            return
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and fps > 0 else 25.0
        writer, frame_index = None, 0
        try:
            while True:
                frames: list[np.ndarray] = []
                while len(frames) < self.detector.batch_size:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                if not frames:
                    break
                for frame, det in zip(frames, self.detector.predict_batch(frames), strict=True):
                    self.record(str(item.path), frame, det, frame_index)
                    frame_index += 1
                    if self.out_dir is not None:
                        if writer is None:
                            target = self.out_dir / item.out_name
                            target.parent.mkdir(parents=True, exist_ok=True)
                            writer, written = open_video_writer(target, fps, (frame.shape[1], frame.shape[0]))
                            log.info("%s: writing the annotated video to %s", item.path, written)
                        writer.write(cv2.cvtColor(draw(frame, det, self.detector.classes), cv2.COLOR_RGB2BGR))
                self.progress.update(len(frames))
        finally:
            cap.release()
            if writer is not None:
                writer.release()
        if frame_index == 0:
            self.fail(f"{item.path}: no frame could be decoded")


def video_frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    cap.release()
    return max(n, 0)


def run(args) -> int:
    """``ssd predict --weights CKPT INPUT... [--weights-kind ema|raw] [--out DIR] [--json FILE] [--score-thresh]
    [--device] [--batch-size] [--no-fuse]``.

    Exit 0 when every input was read, 1 when any failed (each is reported and skipped).
    """
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.score_thresh < 1.0:
        raise ValueError(f"--score-thresh must be in [0, 1), got {args.score_thresh}")
    items, problems = collect_inputs(args.inputs)
    threads = getattr(args, "threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    detector = Detector.from_checkpoint(
        args.weights,
        args.device,
        fuse=not args.no_fuse,
        score_thresh=args.score_thresh,
        batch_size=args.batch_size,
        weights_kind=getattr(args, "weights_kind", None),
        threads=threads,
    )
    images = [it for it in items if it.kind == "image"]
    videos = [it for it in items if it.kind == "video"]
    total = len(images) + sum(video_frame_count(v.path) for v in videos)
    out_dir = Path(args.out) if args.out else None
    with tqdm(
        total=total, unit="img", desc="predict", dynamic_ncols=True, disable=None
    ) as progress:  # no bar off a terminal
        run = Predictor(detector, out_dir, progress)
        for message in problems:
            run.fail(message)
        run.images(images)
        for video in videos:
            run.video(video)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(run.entries, indent=1) + "\n")
    log.info(
        "%d images / frames, %d detections above %.2f%s%s",
        len(run.entries),
        run.num_detections,
        args.score_thresh,
        f"; drawn in {out_dir}" if out_dir else "",
        f"; JSON in {args.json}" if args.json else "",
    )
    if run.failed:
        log.warning("%d input(s) failed and were skipped:\n  %s", len(run.failed), "\n  ".join(run.failed))
        return 1
    return 0
