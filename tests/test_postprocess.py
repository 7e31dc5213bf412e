"""Post-processing: parity with torchvision's SSD.postprocess_detections, rescaling, empty output, invariants."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from ssd.ops.boxes import cxcywh_to_xyxy, decode, encode
from ssd.postprocess import PostProcessor

pytestmark = pytest.mark.numerics


def tv_head(outputs: dict) -> dict:
    return {"bbox_regression": outputs["loc"], "cls_logits": outputs["conf"]}


def assert_same_detections(ours: list[dict], theirs: list[dict], box_atol: float = 1e-3) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert len(a["scores"]) == len(b["scores"]), f"image {i}: {len(a['scores'])} vs {len(b['scores'])} detections"
        assert torch.equal(a["labels"], b["labels"]), f"image {i}: labels differ"
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=box_atol)


def random_outputs(b: int, p: int, generator: torch.Generator) -> dict:
    return {"loc": torch.randn(b, p, 4, generator=generator), "conf": torch.randn(b, p, 21, generator=generator) * 2}


def peaked_outputs(priors: torch.Tensor, generator: torch.Generator, b: int = 2) -> dict:
    """A trained-like output: a few objects, every prior near one predicts it (same box, high score)."""
    p = priors.shape[0]
    priors_xyxy = cxcywh_to_xyxy(priors)
    objects = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.45, 0.3, 0.95, 0.9], [0.6, 0.05, 0.8, 0.3]])
    loc = torch.randn(b, p, 4, generator=generator) * 0.05
    conf = torch.randn(b, p, 21, generator=generator) - 3.0  # weak noise: background dominates elsewhere
    conf[..., 0] += 2.0
    taken = torch.zeros(p, dtype=torch.bool)
    for k, obj in enumerate(objects):
        ctr = (obj[:2] + obj[2:]) / 2
        near = ((priors[:, :2] - ctr).abs() < (obj[2:] - obj[:2]) / 2).all(dim=1)  # prior centre inside the object
        near &= (priors_xyxy[:, 2:] - priors_xyxy[:, :2]).prod(dim=1) > 0.01  # and not tiny
        near &= ~taken
        taken |= near
        n = int(near.sum())
        loc[:, near] += encode(obj.expand(n, 4), priors[near])
        conf[:, near, 2 + 5 * k] += 9.0 + torch.rand(b, n, generator=generator)  # classes 2, 7, 12
        conf[:, near, 3 + 5 * k] += 6.0 + torch.rand(b, n, generator=generator)  # runner-up 3, 8, 13
    return {"loc": loc, "conf": conf}


def test_matches_torchvision_on_random_logits(tv_ssd300, tv_priors):
    g = torch.Generator().manual_seed(0)
    outputs = random_outputs(4, tv_priors.shape[0], g)
    anchors_px = cxcywh_to_xyxy(tv_priors) * 300
    expected = tv_ssd300.postprocess_detections(tv_head(outputs), [anchors_px] * 4, [(300, 300)] * 4)
    ours = PostProcessor()(outputs, tv_priors, (300, 300))
    assert all(len(d["scores"]) == 200 for d in expected)  # random logits fill the output
    assert_same_detections(ours, expected)


def test_matches_torchvision_when_nms_suppresses_most(tv_ssd300, tv_priors):
    g = torch.Generator().manual_seed(1)
    outputs = peaked_outputs(tv_priors, g)
    anchors_px = cxcywh_to_xyxy(tv_priors) * 300
    # precondition: NMS over the 400 best candidates of an image keeps fewer than 200, so the
    # post-processor's initial window (2 x detections) is too small and must grow
    scores = outputs["conf"].softmax(-1)[0, :, 1:]  # [P, C-1]
    top_scores, flat = scores.flatten().topk(400)
    boxes = decode(outputs["loc"][0], tv_priors)[flat // 20] * 300
    kept = batched_nms(boxes, top_scores, flat % 20, 0.45)
    assert len(kept) < 50
    assert (scores > 0.01).sum() > 2000

    expected = tv_ssd300.postprocess_detections(tv_head(outputs), [anchors_px] * 2, [(300, 300)] * 2)
    ours = PostProcessor()(outputs, tv_priors, (300, 300))
    assert all(len(d["scores"]) > 50 for d in expected)
    assert_same_detections(ours, expected)
    # the objects come out first, each once, with their class and box
    # each object comes out once per confident class (2/3, 7/8, 12/13), with its box, ahead of the noise
    objects_px = torch.tensor([[30.0, 30.0, 150.0, 180.0], [135.0, 90.0, 285.0, 270.0], [180.0, 15.0, 240.0, 90.0]])
    for det in ours:
        labels = det["labels"][:6]
        assert labels.sort().values.tolist() == [2, 3, 7, 8, 12, 13]
        torch.testing.assert_close(det["boxes"][:6], objects_px[(labels - 2) // 5], rtol=0, atol=3.0)
        assert det["scores"][:6].min() > 0.75


@pytest.mark.parametrize("score_threshold, detections", [(0.05, 10), (0.2, 200)])
def test_matches_torchvision_other_settings(tv_ssd300, tv_priors, monkeypatch, score_threshold, detections):
    g = torch.Generator().manual_seed(2)
    outputs = random_outputs(2, tv_priors.shape[0], g)
    anchors_px = cxcywh_to_xyxy(tv_priors) * 300
    monkeypatch.setattr(tv_ssd300, "score_thresh", score_threshold)
    monkeypatch.setattr(tv_ssd300, "detections_per_img", detections)
    expected = tv_ssd300.postprocess_detections(tv_head(outputs), [anchors_px] * 2, [(300, 300)] * 2)
    ours = PostProcessor(score_threshold=score_threshold, detections_per_image=detections)(
        outputs, tv_priors, (300, 300)
    )
    assert_same_detections(ours, expected)
    assert all(len(d["scores"]) <= detections for d in ours)
    assert all((d["scores"] > score_threshold).all() for d in ours)


def test_image_sizes_rescale_like_torchvision(tv_ssd300, tv_priors):
    g = torch.Generator().manual_seed(3)
    outputs = random_outputs(3, tv_priors.shape[0], g)
    anchors_px = cxcywh_to_xyxy(tv_priors) * 300
    original = [(480, 640), (120, 500), (1000, 200)]  # (h, w)
    dets = tv_ssd300.postprocess_detections(tv_head(outputs), [anchors_px] * 3, [(300, 300)] * 3)
    expected = tv_ssd300.transform.postprocess(dets, [(300, 300)] * 3, original)
    pp = PostProcessor()
    ours = pp(outputs, tv_priors, (300, 300), image_sizes=original)
    assert_same_detections(ours, expected, box_atol=4e-3)
    # rescaled = input-pixel boxes * original / input, and inside the original image
    plain = pp(outputs, tv_priors, (300, 300))
    for (h, w), a, b in zip(original, ours, plain, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"] * torch.tensor([w / 300, h / 300, w / 300, h / 300]))
        assert a["boxes"].min() >= 0
        assert (a["boxes"][:, [0, 2]] <= w + 1e-3).all() and (a["boxes"][:, [1, 3]] <= h + 1e-3).all()
        assert (a["boxes"][:, [0, 2]] > 300).any() or w <= 300  # really rescaled, not clipped to the input


def test_non_square_input_matches_torchvision(tv_ssd300, tv_priors):
    g = torch.Generator().manual_seed(4)
    outputs = random_outputs(1, tv_priors.shape[0], g)
    in_h, in_w = 200, 300
    anchors_px = cxcywh_to_xyxy(tv_priors) * torch.tensor([in_w, in_h, in_w, in_h])
    expected = tv_ssd300.postprocess_detections(tv_head(outputs), [anchors_px], [(in_h, in_w)])
    ours = PostProcessor()(outputs, tv_priors, (in_h, in_w))
    assert_same_detections(ours, expected)
    assert ours[0]["boxes"][:, [1, 3]].max() <= in_h and ours[0]["boxes"][:, [0, 2]].max() > in_h


def test_all_scores_below_threshold_gives_empty_output(tv_priors):
    p = tv_priors.shape[0]
    conf = torch.zeros(2, p, 21)
    conf[..., 0] = 10.0  # class scores ~ e^-10 < 0.01
    outputs = {"loc": torch.zeros(2, p, 4), "conf": conf}
    for det in PostProcessor()(outputs, tv_priors, (300, 300), image_sizes=[(100, 100), (50, 80)]):
        assert det["boxes"].shape == (0, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (0,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (0,) and det["labels"].dtype == torch.int64


def test_output_invariants(tv_priors):
    g = torch.Generator().manual_seed(5)
    outputs = random_outputs(2, tv_priors.shape[0], g)
    outputs["conf"][1, :, 1:] -= 4.0  # second image: fewer candidates above the threshold
    copies = {k: v.clone() for k, v in outputs.items()}
    priors = tv_priors.clone()
    results = PostProcessor(detections_per_image=50)(outputs, priors, (300, 300))
    for det in results:
        n = len(det["scores"])
        assert 0 < n <= 50
        assert det["labels"].dtype == torch.int64
        assert det["labels"].min() >= 1 and det["labels"].max() <= 20
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted descending
        assert (det["scores"] > 0.01).all()
        b = det["boxes"]
        assert b.shape == (n, 4) and b.min() >= 0 and b.max() <= 300
        assert (b[:, 2:] >= b[:, :2]).all()
    # the caller's tensors are untouched
    assert all(torch.equal(outputs[k], copies[k]) for k in outputs) and torch.equal(priors, tv_priors)
