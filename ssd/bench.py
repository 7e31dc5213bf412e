"""Side-by-side benchmarks against the peer implementation, in one run.

    ssd bench [--only loss postprocess] [--json OUT] [--repeats N]   (or python scripts/bench.py ...)

Each row times ours and the peer on identical inputs, checks the outputs agree, and reports
``speedup = peer_s / ours_s`` next to the ``target`` this project promises (README, "Performance").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import decode_jpeg
from torchvision.ops import box_iou
from torchvision.transforms import v2

from ssd.config import AugmentConfig, PostprocessConfig, PreprocessConfig
from ssd.convert.torchvision import torchvision_model_config
from ssd.data.transforms import build_transforms, mean_fill_rgb
from ssd.loss import MultiBoxLoss, pad_targets
from ssd.model.priors import make_priors, resolve_prior_layout
from ssd.ops.boxes import cxcywh_to_xyxy
from ssd.postprocess import PostProcessor

SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ssd300_case(batch: int, num_classes: int = 21, seed: int = 0):
    """torchvision SSD300 anchors (= our priors for its config), random head outputs and targets."""
    g = torch.Generator().manual_seed(seed)
    priors = make_priors(SSD300_FEATURES, (300, 300), **resolve_prior_layout(torchvision_model_config(num_classes), 6))
    anchors_px = cxcywh_to_xyxy(priors) * 300
    num_priors = priors.shape[0]
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 8, (1,), generator=g))
        boxes = []
        while len(boxes) < n:  # no IoU ties: symmetric boxes make "the best prior" a float-rounding coin toss
            xy = torch.rand(1, 2, generator=g) * 200
            box = torch.cat([xy, xy + torch.rand(1, 2, generator=g) * 90 + 10], 1)
            top2 = box_iou(box, anchors_px)[0].topk(2).values
            if top2[0] - top2[1] > 1e-3:
                boxes.append(box)
        targets.append({"boxes": torch.cat(boxes), "labels": torch.randint(1, num_classes, (n,), generator=g)})
    head = {
        "bbox_regression": torch.randn(batch, num_priors, 4, generator=g),
        "cls_logits": torch.randn(batch, num_priors, num_classes, generator=g),
    }
    return priors, anchors_px, targets, head


def torchvision_ssd(num_classes: int = 21):
    from torchvision.models.detection import ssd300_vgg16

    return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)


def bench_loss(repeats: int) -> dict:
    """Matching + MultiBox loss at batch 32 (8732 priors, 21 classes) vs torchvision's matcher + compute_loss."""
    tv = torchvision_ssd()
    priors, anchors_px, targets, head = ssd300_case(32)
    anchors = [anchors_px] * len(targets)
    criterion = MultiBoxLoss()
    gt_boxes, gt_labels = pad_targets([t["boxes"] / 300 for t in targets], [t["labels"] for t in targets])
    outputs = {"loc": head["bbox_regression"], "conf": head["cls_logits"]}

    def peer():
        matched = [tv.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
        return tv.compute_loss(targets, head, anchors, matched)

    def ours():
        return criterion(outputs, gt_boxes, gt_labels, priors)

    p, o = peer(), ours()
    for a, b in ((p["bbox_regression"], o["loc"]), (p["classification"], o["conf"])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    return {"name": "loss", "ours_s": timeit(ours, repeats), "peer": "torchvision 0.29 SSD matcher+compute_loss",
            "peer_s": timeit(peer, repeats), "target": 2.0}  # fmt: skip


def bench_postprocess(repeats: int) -> dict:
    """Decode + per-class NMS at batch 32 (random logits) vs torchvision's postprocess_detections."""
    tv = torchvision_ssd()
    priors, anchors_px, _, head = ssd300_case(32)
    cfg = PostprocessConfig()
    post = PostProcessor(cfg.score_threshold, cfg.nms_threshold, cfg.topk_candidates, cfg.detections_per_image)
    anchors = [anchors_px] * head["cls_logits"].shape[0]
    sizes = [(300, 300)] * len(anchors)
    outputs = {"loc": head["bbox_regression"], "conf": head["cls_logits"]}

    def peer():
        return tv.postprocess_detections(head, anchors, sizes)

    def ours():
        return post(outputs, priors, (300, 300))

    for a, b in zip(peer(), ours()):
        assert torch.equal(a["labels"], b["labels"]), "post-processing labels differ from torchvision"
        torch.testing.assert_close(b["scores"], a["scores"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)
    return {"name": "postprocess", "ours_s": timeit(ours, repeats), "peer": "torchvision 0.29 SSD postprocess_detections",
            "peer_s": timeit(peer, max(1, repeats // 3)), "target": 3.0}  # fmt: skip


def synthetic_jpegs(count: int = 32, seed: int = 0) -> list[tuple[bytes, np.ndarray, np.ndarray]]:
    """``count`` 500x375 JPEGs (gradient, noise, filled boxes), 1..6 boxes each: (bytes, boxes_px, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    samples = []
    for _ in range(count):
        base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6), (xx + yy) * 0.2], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        n = int(rng.integers(1, 7))
        xy = rng.uniform(0, [400, 300], (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(15, 250, (n, 2)), [500, 375])], 1).astype(np.float32)
        for x1, y1, x2, y2 in boxes.astype(int):
            cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok, "JPEG encoding failed"
        samples.append((jpeg.tobytes(), boxes, rng.integers(1, 21, n)))
    return samples


def bench_augment(repeats: int) -> dict:
    """JPEG decode + SSD train augmentation to 300x300 on one thread vs torchvision's transforms.v2 recipe.

    Per image over 32 synthetic 500x375 JPEGs. Ours: cv2.imdecode + ``build_transforms(train=True)``.
    Peer: decode_jpeg + RandomPhotometricDistort(p=1), RandomZoomOut(fill=mean), RandomIoUCrop,
    RandomHorizontalFlip, Resize((300, 300)). Repeats alternate the two sides (the CPU may be shared).
    """
    samples = synthetic_jpegs()
    ours_t = build_transforms(AugmentConfig(), PreprocessConfig(), 300, train=True, seed=0)
    peer_t = v2.Compose([
        v2.RandomPhotometricDistort(p=1), v2.RandomZoomOut(fill=list(mean_fill_rgb(PreprocessConfig()))),
        v2.RandomIoUCrop(), v2.RandomHorizontalFlip(), v2.Resize((300, 300)),
    ])  # fmt: skip
    peer_in = [(torch.frombuffer(bytearray(b), dtype=torch.uint8), torch.from_numpy(bx)) for b, bx, _ in samples]
    ours_in = [(np.frombuffer(b, np.uint8), bx, lab) for b, bx, lab in samples]

    def ours():
        for jpeg, boxes, labels in ours_in:
            image = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            out = ours_t(image, boxes, labels)
        return out

    def peer():
        for jpeg, boxes in peer_in:
            image = tv_tensors.Image(decode_jpeg(jpeg))
            bbox = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
            out = peer_t(image, bbox)
        return out

    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        image, boxes, _ = ours()
        assert image.shape == (300, 300, 3) and image.dtype == np.uint8 and ((boxes >= 0) & (boxes <= 1)).all()
        assert tuple(peer()[0].shape) == (3, 300, 300)
        ours_s, peer_s = [], []
        for _ in range(repeats):  # interleaved, so a busy neighbour slows both sides alike
            for fn, times in ((ours, ours_s), (peer, peer_s)):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) / len(samples))
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    return {"name": "augment", "ours_s": statistics.median(ours_s), "peer": "torchvision 0.29 transforms.v2 SSD recipe",
            "peer_s": statistics.median(peer_s), "target": 4.0}  # fmt: skip


BENCHES = {"loss": bench_loss, "postprocess": bench_postprocess, "augment": bench_augment}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these rows")
    parser.add_argument("--json", help="write the rows as a JSON list to this file")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per side (median reported)")
    args = parser.parse_args(argv)

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'row':<12} {'ours':>10} {'peer':>10} {'speedup':>8} {'target':>7}  peer")
    for name in args.only or list(BENCHES):
        row = BENCHES[name](args.repeats)
        row["speedup"] = row["peer_s"] / row["ours_s"]
        rows.append(row)
        ok = "ok" if row["speedup"] >= row["target"] else "MISSED"
        print(f"{name:<12} {row['ours_s'] * 1e3:>8.1f}ms {row['peer_s'] * 1e3:>8.1f}ms {row['speedup']:>7.2f}x {row['target']:>6.2f}x  {row['peer']} [{ok}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: r[k] for k in ("name", "ours_s", "peer", "peer_s", "speedup", "target")} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
