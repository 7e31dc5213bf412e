"""ssd.ops.boxes: format conversions, IoU, encode/decode (against hand values and torchvision)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils

from ssd.ops.boxes import (
    BBOX_XFORM_CLIP,
    box_area,
    box_iou,
    cxcywh_to_xyxy,
    decode,
    encode,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def random_xyxy(n: int, *batch: int, scale: float = 1.0, generator=None, dtype=torch.float32) -> torch.Tensor:
    """Valid xyxy boxes with positive width and height, ``Tensor[*batch, n, 4]``."""
    xy = torch.rand(*batch, n, 2, generator=generator, dtype=dtype) * 0.8 * scale
    wh = (torch.rand(*batch, n, 2, generator=generator, dtype=dtype) * 0.5 + 0.01) * scale
    return torch.cat((xy, xy + wh), dim=-1)


# --- conversions ------------------------------------------------------------------------


def test_conversions_hand_values():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    assert torch.equal(xyxy_to_cxcywh(xyxy), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))
    assert torch.equal(xyxy_to_xywh(xyxy), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    assert torch.equal(cxcywh_to_xyxy(torch.tensor([[3.0, 6.0, 4.0, 8.0]])), xyxy)
    assert torch.equal(xywh_to_xyxy(torch.tensor([[1.0, 2.0, 4.0, 8.0]])), xyxy)


def test_conversions_round_trip_with_batch_dims():
    g = torch.Generator().manual_seed(0)
    xyxy = random_xyxy(7, 3, 2, generator=g, dtype=torch.float64)  # [3, 2, 7, 4]
    assert xyxy_to_cxcywh(xyxy).shape == (3, 2, 7, 4)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, rtol=0, atol=1e-12)
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy, rtol=0, atol=1e-12)
    # cxcywh -> xyxy -> xywh -> xyxy -> cxcywh
    cxcywh = xyxy_to_cxcywh(xyxy)
    back = xyxy_to_cxcywh(xywh_to_xyxy(xyxy_to_xywh(cxcywh_to_xyxy(cxcywh))))
    torch.testing.assert_close(back, cxcywh, rtol=0, atol=1e-12)
    # agrees with torchvision's box_convert
    for fmt, fn in (("cxcywh", xyxy_to_cxcywh), ("xywh", xyxy_to_xywh)):
        flat = xyxy.reshape(-1, 4)
        torch.testing.assert_close(fn(flat), torchvision.ops.box_convert(flat, "xyxy", fmt))


def test_conversions_keep_dtype():
    for dtype in (torch.float64, torch.float16):
        b = torch.tensor([[0.0, 0.0, 1.0, 2.0]], dtype=dtype)
        for fn in (xyxy_to_cxcywh, cxcywh_to_xyxy, xyxy_to_xywh, xywh_to_xyxy, box_area):
            assert fn(b).dtype == dtype


# --- area and IoU -----------------------------------------------------------------------


def test_box_area_degenerate_is_zero():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 1.0, 1.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0, 0.0]


def test_box_iou_hand_value():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1.0 / 7.0, 1.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_matches_torchvision(dtype):
    g = torch.Generator().manual_seed(1)
    b1, b2 = random_xyxy(13, generator=g, dtype=dtype), random_xyxy(29, generator=g, dtype=dtype)
    ours = box_iou(b1, b2)
    assert ours.shape == (13, 29) and ours.dtype == dtype
    torch.testing.assert_close(ours, torchvision.ops.box_iou(b1, b2))
    assert (ours > 0).any() and (ours == 0).any()  # the random case exercises overlap and disjointness


def test_box_iou_broadcasts_batch_against_priors():
    g = torch.Generator().manual_seed(2)
    gt = random_xyxy(5, 3, generator=g)  # [B=3, G=5, 4]
    priors = random_xyxy(11, generator=g)  # [P=11, 4]
    iou = box_iou(gt, priors)
    assert iou.shape == (3, 5, 11)
    for i in range(3):
        torch.testing.assert_close(iou[i], torchvision.ops.box_iou(gt[i], priors))
    # and the other way round: [G, 4] x [B, P, 4] -> [B, G, P]
    iou_t = box_iou(priors, gt)
    assert iou_t.shape == (3, 11, 5)
    torch.testing.assert_close(iou_t, iou.transpose(1, 2))


def test_box_iou_zero_area_pairs_give_zero_not_nan():
    empty = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.9], [0.3, 0.3, 0.3, 0.3]])
    iou = box_iou(empty, empty)
    assert torch.equal(iou, torch.zeros(3, 3))
    normal = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(box_iou(empty, normal), torch.zeros(3, 1))


def test_box_iou_does_not_mutate_inputs():
    g = torch.Generator().manual_seed(3)
    b1, b2 = random_xyxy(4, 2, generator=g), random_xyxy(6, generator=g)
    c1, c2 = b1.clone(), b2.clone()
    box_iou(b1, b2)
    assert torch.equal(b1, c1) and torch.equal(b2, c2)


# --- encode / decode ----------------------------------------------------------------------


def test_encode_hand_value():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box = cxcywh_to_xyxy(torch.tensor([[0.52, 0.46, 0.4, 0.1]]))
    expected = torch.tensor([[0.02 / (0.1 * 0.2), -0.04 / (0.1 * 0.4), math.log(2.0) / 0.2, math.log(0.25) / 0.2]])
    torch.testing.assert_close(encode(box, prior, (0.1, 0.2)), expected)


@pytest.mark.parametrize("variances", [(0.1, 0.2), (0.2, 0.5)])
def test_encode_decode_round_trip(variances):
    g = torch.Generator().manual_seed(4)
    boxes = random_xyxy(50, 2, generator=g, dtype=torch.float64)  # [2, 50, 4]
    priors = xyxy_to_cxcywh(random_xyxy(50, generator=g, dtype=torch.float64))  # [50, 4], broadcast over batch
    deltas = encode(boxes, priors, variances)
    assert deltas.shape == (2, 50, 4)
    torch.testing.assert_close(decode(deltas, priors, variances), boxes, rtol=0, atol=1e-10)


def test_decode_zero_deltas_gives_priors():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.3]])
    torch.testing.assert_close(decode(torch.zeros(2, 4), priors), cxcywh_to_xyxy(priors))


def test_decode_clamps_log_scale():
    priors = torch.tensor([[0.5, 0.5, 0.02, 0.04]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e6]])  # exp(2e3) would overflow
    out = decode(deltas, priors, (0.1, 0.2))
    assert torch.isfinite(out).all()
    wh = out[0, 2:] - out[0, :2]
    torch.testing.assert_close(wh, torch.tensor([0.02, 0.04]) * 1000.0 / 16.0, rtol=1e-6, atol=0)
    torch.testing.assert_close(xyxy_to_cxcywh(out)[0, :2], torch.tensor([0.5, 0.5]))
    # just under the clamp the box is not clamped: dw * v1 = log(1000/16) - 0.1
    below = torch.tensor([[0.0, 0.0, (BBOX_XFORM_CLIP - 0.1) / 0.2, 0.0]])
    w = decode(below, priors)[0, 2] - decode(below, priors)[0, 0]
    torch.testing.assert_close(w, torch.tensor(0.02 * 62.5 * math.exp(-0.1)), rtol=1e-5, atol=0)


def test_encode_matches_torchvision_boxcoder_on_pixels():
    g = torch.Generator().manual_seed(5)
    anchors_px = random_xyxy(40, scale=300.0, generator=g)
    gt_px = random_xyxy(40, scale=300.0, generator=g)
    coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    expected = coder.encode_single(gt_px, anchors_px)
    ours = encode(gt_px, xyxy_to_cxcywh(anchors_px), (0.1, 0.2))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # same targets whatever the frame: pixels or normalised
    torch.testing.assert_close(encode(gt_px / 300, xyxy_to_cxcywh(anchors_px / 300)), expected, rtol=1e-4, atol=1e-4)
    # and decode inverts torchvision's encoding like torchvision's decode does
    rel = torch.randn(40, 4, generator=g)
    torch.testing.assert_close(
        decode(rel, xyxy_to_cxcywh(anchors_px)), coder.decode_single(rel, anchors_px), rtol=1e-5, atol=1e-3
    )


def test_encode_degenerate_box_is_finite():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    box = torch.tensor([[0.4, 0.4, 0.4, 0.6]])  # zero width
    assert torch.isfinite(encode(box, prior)).all()


def test_encode_decode_do_not_mutate_and_keep_dtype():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.7]], dtype=torch.float64)
    priors = torch.tensor([[0.3, 0.4, 0.3, 0.3]], dtype=torch.float64)
    deltas = torch.tensor([[1.0, -1.0, 100.0, -0.5]], dtype=torch.float64)
    copies = [t.clone() for t in (boxes, priors, deltas)]
    assert encode(boxes, priors).dtype == torch.float64
    assert decode(deltas, priors).dtype == torch.float64
    for t, c in zip((boxes, priors, deltas), copies, strict=True):
        assert torch.equal(t, c)
