"""Matching and MultiBox loss: torchvision parity, empty/degenerate targets, batching, hard negatives,
equality with the pre-fixed-shape loss (tests/loss_reference.py), no host sync (one compiled graph, CUDA sync debug)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from loss_reference import reference_multibox_loss

from ssd.loss import MultiBoxLoss, match
from ssd.ops.boxes import box_iou, cxcywh_to_xyxy, pad_targets, xyxy_to_cxcywh

pytestmark = pytest.mark.numerics


def random_targets_px(num_boxes: list[int], anchors_px: torch.Tensor, generator: torch.Generator) -> list[dict]:
    """Random 300 px targets whose matching has no near-ties (so pixel vs normalised IoU cannot flip it)."""
    targets = []
    for n in num_boxes:
        while True:
            xy = torch.rand(n, 2, generator=generator) * 240
            wh = torch.rand(n, 2, generator=generator) * 150 + 15
            boxes = torch.cat((xy, (xy + wh).clamp(max=300)), dim=1)
            if n == 0:
                break
            iou = box_iou(boxes, anchors_px)  # [n, P]
            top2 = iou.topk(2, dim=1).values
            near_threshold = ((iou - 0.5).abs() < 1e-3).any()
            gt_ties = n > 1 and ((iou.topk(2, dim=0).values.diff(dim=0).abs() < 1e-3) & (iou.max(0).values > 0.4)).any()
            if (top2[:, 0] - top2[:, 1] > 1e-3).all() and not near_threshold and not gt_ties:
                break
        labels = torch.randint(1, 21, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def ours_from_targets(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_targets([t["boxes"] / 300 for t in targets], [t["labels"] for t in targets])


def tv_matched_idxs(tv_model, targets, anchors_px) -> list[torch.Tensor]:
    """As torchvision's SSD.forward does in training mode."""
    out = []
    for t in targets:
        if t["boxes"].numel() == 0:
            out.append(torch.full((anchors_px.shape[0],), -1, dtype=torch.int64))
        else:
            out.append(tv_model.proposal_matcher(torchvision.ops.box_iou(t["boxes"], anchors_px)))
    return out


def test_loss_matches_torchvision(tv_ssd300, tv_priors):
    g = torch.Generator().manual_seed(0)
    anchors_px = cxcywh_to_xyxy(tv_priors) * 300
    targets = random_targets_px([3, 1, 6, 0], anchors_px, g)  # one image without objects
    b, p = len(targets), tv_priors.shape[0]
    head = {"bbox_regression": torch.randn(b, p, 4, generator=g), "cls_logits": torch.randn(b, p, 21, generator=g)}
    matched = tv_matched_idxs(tv_ssd300, targets, anchors_px)
    expected = tv_ssd300.compute_loss(targets, head, [anchors_px] * b, matched)

    gt_boxes, gt_labels = ours_from_targets(targets)
    assert gt_boxes.shape == (4, 6, 4) and gt_labels.dtype == torch.int64
    idx = match(gt_boxes, gt_labels, tv_priors)
    assert torch.equal(idx, torch.stack(matched))
    assert (idx >= 0).sum() > 3 * 10  # more positives than forced ones: the threshold rule is exercised
    ours = MultiBoxLoss()({"loc": head["bbox_regression"], "conf": head["cls_logits"]}, gt_boxes, gt_labels, tv_priors)
    torch.testing.assert_close(ours["loc"], expected["bbox_regression"], rtol=1e-3, atol=0)
    torch.testing.assert_close(ours["conf"], expected["classification"], rtol=1e-3, atol=0)


def test_empty_targets_give_zero_finite_loss():
    torch.manual_seed(0)
    priors = xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.8, 0.8]]))
    gt_boxes, gt_labels = pad_targets([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)] * 2)
    assert gt_boxes.shape == (2, 1, 4) and torch.equal(gt_labels, torch.zeros(2, 1, dtype=torch.int64))
    loc = torch.randn(2, 3, 4, requires_grad=True)
    conf = torch.randn(2, 3, 5, requires_grad=True)
    out = MultiBoxLoss()({"loc": loc, "conf": conf}, gt_boxes, gt_labels, priors)
    assert out["loc"].item() == 0.0 and out["conf"].item() == 0.0  # no positives -> no negatives
    (out["loc"] + out["conf"]).backward()
    assert torch.equal(loc.grad, torch.zeros_like(loc)) and torch.equal(conf.grad, torch.zeros_like(conf))
    assert torch.equal(match(gt_boxes, gt_labels, priors), torch.full((2, 3), -1))


def test_empty_image_in_batch_adds_nothing(tv_priors):
    g = torch.Generator().manual_seed(1)
    p = tv_priors.shape[0]
    boxes = [torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.8]])]
    labels = [torch.tensor([4, 7])]
    loc, conf = torch.randn(2, p, 4, generator=g), torch.randn(2, p, 21, generator=g)
    crit = MultiBoxLoss()
    alone = crit({"loc": loc[:1], "conf": conf[:1]}, *pad_targets(boxes, labels), tv_priors)
    batch = crit(
        {"loc": loc, "conf": conf},
        *pad_targets(boxes + [torch.zeros(0, 4)], labels + [torch.zeros(0, dtype=torch.int64)]),
        tv_priors,
    )
    torch.testing.assert_close(batch["loc"], alone["loc"])
    torch.testing.assert_close(batch["conf"], alone["conf"])


def test_degenerate_gt_box_gives_finite_loss(tv_priors):
    g = torch.Generator().manual_seed(2)
    p = tv_priors.shape[0]
    gt_boxes = torch.tensor([[[0.3, 0.2, 0.3, 0.7], [0.1, 0.1, 0.5, 0.5]]])  # first box has x2 == x1
    gt_labels = torch.tensor([[3, 5]])
    loc = torch.randn(1, p, 4, generator=g, requires_grad=True)
    conf = torch.randn(1, p, 21, generator=g, requires_grad=True)
    out = MultiBoxLoss()({"loc": loc, "conf": conf}, gt_boxes, gt_labels, tv_priors)
    assert torch.isfinite(out["loc"]) and torch.isfinite(out["conf"]) and out["loc"] > 0
    (out["loc"] + out["conf"]).backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(conf.grad).all()


def test_batched_loss_is_reweighted_sum_of_per_image_losses(tv_priors):
    g = torch.Generator().manual_seed(3)
    p = tv_priors.shape[0]
    boxes = [
        torch.tensor([[0.1, 0.1, 0.45, 0.5], [0.5, 0.2, 0.95, 0.9], [0.3, 0.6, 0.5, 0.75]]),
        torch.tensor([[0.05, 0.3, 0.3, 0.9]]),
    ]
    labels = [torch.tensor([1, 2, 3]), torch.tensor([20])]
    loc, conf = torch.randn(2, p, 4, generator=g), torch.randn(2, p, 21, generator=g)
    crit = MultiBoxLoss()
    batch = crit({"loc": loc, "conf": conf}, *pad_targets(boxes, labels), tv_priors)
    loc_sum = conf_sum = 0.0
    num_pos = []
    for i in range(2):
        # pad each image differently (4 extra padding rows with non-zero boxes): must not matter
        pb = torch.cat((boxes[i], torch.rand(4, 4, generator=g).sort(dim=1).values[:, [0, 1, 2, 3]]))
        pl = torch.cat((labels[i], torch.zeros(4, dtype=torch.int64)))
        single = crit({"loc": loc[i : i + 1], "conf": conf[i : i + 1]}, pb[None], pl[None], tv_priors)
        n = int((match(pb[None], pl[None], tv_priors) >= 0).sum())
        num_pos.append(n)
        loc_sum += single["loc"] * n
        conf_sum += single["conf"] * n
    assert num_pos[0] > num_pos[1] > 0  # unequal positives: a plain mean of per-image losses would differ
    torch.testing.assert_close(batch["loc"], loc_sum / sum(num_pos), rtol=1e-5, atol=0)
    torch.testing.assert_close(batch["conf"], conf_sum / sum(num_pos), rtol=1e-5, atol=0)


def test_match_batch_equals_per_image_with_other_padding(tv_priors):
    g = torch.Generator().manual_seed(4)
    boxes = [
        torch.tensor([[0.1, 0.1, 0.45, 0.5], [0.5, 0.2, 0.95, 0.9]]),
        torch.tensor([[0.05, 0.3, 0.3, 0.9]]),
        torch.zeros(0, 4),
    ]
    labels = [torch.tensor([1, 2]), torch.tensor([3]), torch.zeros(0, dtype=torch.int64)]
    batch = match(*pad_targets(boxes, labels), tv_priors)
    assert batch.shape == (3, tv_priors.shape[0])
    for i in range(3):
        # padding rows carry real-looking boxes (one equal to a prior); label 0 must keep them out
        junk = torch.cat((cxcywh_to_xyxy(tv_priors[100:101]), torch.rand(3, 4, generator=g)))
        pb = torch.cat((boxes[i], junk))[None]
        pl = torch.cat((labels[i], torch.zeros(4, dtype=torch.int64)))[None]
        single = match(pb, pl, tv_priors)[0]
        assert torch.equal(single, batch[i])
        assert single.max() < len(boxes[i])  # never a padding row
    assert (batch[2] == -1).all()


def make_priors_xyxy(boxes: list[list[float]]) -> torch.Tensor:
    return xyxy_to_cxcywh(torch.tensor(boxes))


def test_match_forces_best_prior_below_threshold():
    priors = make_priors_xyxy([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0], [0.0, 0.6, 0.3, 0.9]])
    gt = torch.tensor([[[0.6, 0.6, 0.9, 0.8]]])  # IoU with prior 1 = 0.06/0.25 = 0.24 < 0.5
    torch.testing.assert_close(box_iou(gt[0], cxcywh_to_xyxy(priors)), torch.tensor([[0.0, 0.24, 0.0]]))
    assert match(gt, torch.tensor([[7]]), priors).tolist() == [[-1, 0, -1]]
    # a second GT exactly on prior 2 gets it; the first keeps its forced prior
    gt2 = torch.tensor([[[0.6, 0.6, 0.9, 0.8], [0.0, 0.6, 0.3, 0.9]]])
    assert match(gt2, torch.tensor([[7, 2]]), priors).tolist() == [[-1, 0, 1]]


def test_match_threshold_rule():
    priors = make_priors_xyxy([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.4, 0.5], [0.0, 0.0, 0.2, 0.5]])
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])  # IoUs 1.0, 0.8, 0.4
    assert match(gt, torch.tensor([[1]]), priors, iou_threshold=0.5).tolist() == [[0, 0, -1]]
    assert match(gt, torch.tensor([[1]]), priors, iou_threshold=0.4).tolist() == [[0, 0, 0]]  # >= threshold
    assert match(gt, torch.tensor([[1]]), priors, iou_threshold=0.9).tolist() == [[0, -1, -1]]


def test_match_shared_best_prior_later_gt_wins():
    priors = make_priors_xyxy([[0.2, 0.2, 0.6, 0.6], [0.7, 0.7, 0.9, 0.9]])
    a = [0.2, 0.2, 0.55, 0.6]  # IoU 0.875 with prior 0
    b = [0.25, 0.2, 0.6, 0.6]  # IoU 0.875 with prior 0
    c = [0.2, 0.2, 0.6, 0.5]  # IoU 0.75 with prior 0
    labels = torch.tensor([[1, 2]])
    assert match(torch.tensor([[a, b]]), labels, priors).tolist() == [[1, -1]]
    assert match(torch.tensor([[b, a]]), labels, priors).tolist() == [[1, -1]]
    # the forced rule overrides the higher-IoU threshold match: c is later, so c wins prior 0
    assert match(torch.tensor([[a, c]]), labels, priors).tolist() == [[1, -1]]
    assert match(torch.tensor([[c, a]]), labels, priors).tolist() == [[1, -1]]
    # a padding row after them, even on the same box, does not take the prior
    gt = torch.tensor([[a, c, a]])
    assert match(gt, torch.tensor([[1, 2, 0]]), priors).tolist() == [[1, -1]]


def per_prior_ce(conf: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(conf, labels, reduction="none")


def test_hard_negative_mining_counts_and_choice():
    # 10 disjoint priors on a row; image 0 has 1 GT (on prior 0), image 1 has 3 GTs (priors 0, 1, 2)
    priors = make_priors_xyxy([[0.1 * i, 0.0, 0.1 * i + 0.08, 0.1] for i in range(10)])
    xyxy = cxcywh_to_xyxy(priors)
    gt_boxes, gt_labels = pad_targets([xyxy[:1], xyxy[:3]], [torch.tensor([2]), torch.tensor([1, 2, 3])])
    # background logit decreasing in a shuffled order: the loss rank of each negative is known
    order = torch.tensor([9, 3, 7, 1, 5, 8, 2, 6, 4, 0])
    conf = torch.zeros(2, 10, 4)
    conf[:, :, 0] = order.float() * 0.3  # lower background logit -> higher background loss
    loc = torch.zeros(2, 10, 4)
    out = MultiBoxLoss(neg_pos_ratio=3.0)({"loc": loc, "conf": conf}, gt_boxes, gt_labels, priors)
    idx = match(gt_boxes, gt_labels, priors)
    assert idx.tolist() == [[0] + [-1] * 9, [0, 1, 2] + [-1] * 7]
    bg = per_prior_ce(conf[0], torch.zeros(10, dtype=torch.int64))  # same for both images
    # image 0: 1 positive -> 3 negatives, the highest-loss ones among priors 1..9 (lowest order: 1, 3, 6)
    neg0 = sorted(range(1, 10), key=lambda j: order[j])[:3]
    assert sorted(neg0) == [3, 6, 9]
    pos0 = per_prior_ce(conf[0, :1], torch.tensor([2])).sum()
    # image 1: 3 positives -> min(9, 7 remaining) = all 7 negatives
    pos1 = per_prior_ce(conf[1, :3], torch.tensor([1, 2, 3])).sum()
    expected = (pos0 + bg[neg0].sum() + pos1 + bg[3:].sum()) / 4
    torch.testing.assert_close(out["conf"], expected)
    # ratio 1: one negative per positive, per image
    out1 = MultiBoxLoss(neg_pos_ratio=1.0)({"loc": loc, "conf": conf}, gt_boxes, gt_labels, priors)
    neg1 = sorted(range(3, 10), key=lambda j: order[j])[:3]
    expected1 = (pos0 + bg[neg0[:1]].sum() + pos1 + bg[neg1].sum()) / 4
    torch.testing.assert_close(out1["conf"], expected1)
    # ratio 0: positives only
    out0 = MultiBoxLoss(neg_pos_ratio=0.0)({"loc": loc, "conf": conf}, gt_boxes, gt_labels, priors)
    torch.testing.assert_close(out0["conf"], (pos0 + pos1) / 4)


def test_loc_gradient_only_at_positives_and_box_weight(tv_priors):
    g = torch.Generator().manual_seed(5)
    p = tv_priors.shape[0]
    gt_boxes, gt_labels = pad_targets([torch.tensor([[0.2, 0.2, 0.6, 0.7]])], [torch.tensor([9])])
    loc = torch.randn(1, p, 4, generator=g, requires_grad=True)
    conf = torch.randn(1, p, 21, generator=g)
    out = MultiBoxLoss()({"loc": loc, "conf": conf}, gt_boxes, gt_labels, tv_priors)
    out["loc"].backward()
    pos = match(gt_boxes, gt_labels, tv_priors) >= 0
    assert pos.sum() > 1
    assert torch.equal(loc.grad.abs().sum(-1) > 0, pos)
    double = MultiBoxLoss(box_weight=2.0)({"loc": loc, "conf": conf}, gt_boxes, gt_labels, tv_priors)
    torch.testing.assert_close(double["loc"], 2 * out["loc"])
    torch.testing.assert_close(double["conf"], out["conf"])


def test_perfect_prediction_has_zero_box_loss(tv_priors):
    from ssd.ops.boxes import encode

    gt_boxes, gt_labels = pad_targets(
        [torch.tensor([[0.2, 0.2, 0.6, 0.7], [0.55, 0.1, 0.9, 0.4]])], [torch.tensor([1, 2])]
    )
    idx = match(gt_boxes, gt_labels, tv_priors)[0]
    loc = encode(gt_boxes[0, idx.clamp(min=0)], tv_priors)[None]  # exact targets at positives
    out = MultiBoxLoss()({"loc": loc, "conf": torch.zeros(1, tv_priors.shape[0], 21)}, gt_boxes, gt_labels, tv_priors)
    assert out["loc"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_does_not_mutate_inputs(tv_priors):
    g = torch.Generator().manual_seed(6)
    p = tv_priors.shape[0]
    outputs = {"loc": torch.randn(2, p, 4, generator=g), "conf": torch.randn(2, p, 21, generator=g)}
    gt_boxes, gt_labels = pad_targets(
        [torch.tensor([[0.2, 0.2, 0.6, 0.7]]), torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.5, 0.5, 0.6, 0.6]])],
        [torch.tensor([3]), torch.tensor([1, 2])],
    )
    priors = tv_priors.clone()
    copies = {k: v.clone() for k, v in outputs.items()}, gt_boxes.clone(), gt_labels.clone()
    MultiBoxLoss()(outputs, gt_boxes, gt_labels, priors)
    match(gt_boxes, gt_labels, priors)
    assert all(torch.equal(outputs[k], copies[0][k]) for k in outputs)
    assert torch.equal(gt_boxes, copies[1]) and torch.equal(gt_labels, copies[2]) and torch.equal(priors, tv_priors)


def test_zero_area_box_is_not_forced_onto_prior_zero(tv_priors):
    # IoU 0 with every prior: argmax would be prior 0 (top-left corner) and one wild target would dominate
    gt_boxes = torch.tensor([[[0.7, 0.6, 0.7, 0.9], [0.1, 0.1, 0.5, 0.5]]])
    gt_labels = torch.tensor([[3, 5]])
    idx = match(gt_boxes, gt_labels, tv_priors)
    assert not (idx == 0).any()
    assert (idx == 1).sum() >= 1
    assert idx[0, 0] == -1


# --- the fixed-shape loss equals the pre-rewrite one (nonzero + topk(k), tests/loss_reference.py) ---


def random_case(seed: int) -> dict:
    """A small random batch: 1-4 images of 0-5 objects (junk boxes in the padding rows), 4-200 random priors.

    Every fourth seed has few priors and a low IoU threshold: many positives, so ``num_neg`` is capped by
    the background priors left.
    """
    g = torch.Generator().manual_seed(seed)
    crowded = seed % 4 == 3
    b = int(torch.randint(1, 5, (1,), generator=g))
    p = int(torch.randint(4, 12 if crowded else 200, (1,), generator=g))
    c = int(torch.randint(2, 8, (1,), generator=g))
    priors = torch.cat((torch.rand(p, 2, generator=g), torch.rand(p, 2, generator=g) * 0.5 + 0.05), dim=1)
    boxes, labels = [], []
    for _ in range(b):
        n = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.8
        boxes.append(torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 0.5 + 0.02), dim=1).clamp(max=1))
        labels.append(torch.randint(1, c, (n,), generator=g))
    gt_boxes, gt_labels = pad_targets(boxes, labels)
    junk = torch.rand(gt_boxes.shape, generator=g) * 2 - 0.5  # boxes of any shape, even x2 < x1
    return {
        "outputs": {"loc": torch.randn(b, p, 4, generator=g) * 2, "conf": torch.randn(b, p, c, generator=g) * 3},
        "gt_boxes": torch.where(gt_labels[..., None] > 0, gt_boxes, junk),
        "gt_labels": gt_labels,
        "priors": priors,
        "kwargs": {
            "iou_threshold": 0.1 if crowded else (0.5, 0.3)[seed % 2],
            "neg_pos_ratio": (3.0, 1.0, 0.5, 10.0)[seed % 4],
        },
    }


def loss_and_grads(fn, case: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    loc = case["outputs"]["loc"].clone().requires_grad_()
    conf = case["outputs"]["conf"].clone().requires_grad_()
    out = fn({"loc": loc, "conf": conf}, case["gt_boxes"], case["gt_labels"], case["priors"])
    (out["loc"] + out["conf"]).backward()
    return {k: v.detach() for k, v in out.items()}, loc.grad, conf.grad


STATIC_SHAPES = None  # MultiBoxLoss.static_shapes of ours(): None (on the CPU: k read back), or True (the GPU's path)


def ours(outputs, gt_boxes, gt_labels, priors, **kwargs):
    criterion = MultiBoxLoss(**kwargs)
    criterion.static_shapes = STATIC_SHAPES
    return criterion(outputs, gt_boxes, gt_labels, priors)


@pytest.fixture(params=[None, True], ids=["cpu-k", "static-k"])
def both_paths(request, monkeypatch):
    """Run a test on both selections of hard negatives: k = the batch's largest num_neg (eager, CPU) and k = P
    (the accelerator's and torch.compile's fixed shapes)."""
    monkeypatch.setattr(sys.modules[__name__], "STATIC_SHAPES", request.param)
    return request.param


def num_pos_neg(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives per image, ``[B]`` each, by the rule of the reference loss."""
    pos = match(case["gt_boxes"], case["gt_labels"], case["priors"], case["kwargs"]["iou_threshold"]) >= 0
    num_pos = pos.sum(dim=1)
    return num_pos, torch.minimum((case["kwargs"]["neg_pos_ratio"] * num_pos).long(), pos.shape[1] - num_pos)


def assert_equals_reference(case: dict, ties: bool = False) -> None:
    """Loss terms and gradients equal to the reference to 1e-5; with tied losses, gradients up to
    which tied prior got it."""
    kw = case["kwargs"]
    out, loc_grad, conf_grad = loss_and_grads(lambda *a: ours(*a, **kw), case)
    ref, ref_loc_grad, ref_conf_grad = loss_and_grads(lambda *a: reference_multibox_loss(*a, **kw), case)
    for key in ("loc", "conf"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loc_grad, ref_loc_grad, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loc_grad).all() and torch.isfinite(conf_grad).all()
    # exactly num_pos + num_neg priors of each image get a classification gradient
    num_pos, num_neg = num_pos_neg(case)
    assert torch.equal(conf_grad.ne(0).any(dim=2).sum(dim=1), num_pos + num_neg)
    if ties:  # the same multiset of per-prior gradients in each image
        conf_grad, ref_conf_grad = conf_grad.flatten(1).sort(dim=1).values, ref_conf_grad.flatten(1).sort(dim=1).values
    torch.testing.assert_close(conf_grad, ref_conf_grad, rtol=1e-5, atol=1e-5)


def test_loss_equals_reference_on_random_cases(both_paths):
    seen = {
        "image without objects": 0,
        "num_neg capped by the background": 0,
        "no negatives": 0,
        "threshold positives": 0,
    }
    for seed in range(50):
        case = random_case(seed)
        assert_equals_reference(case)
        num_pos, num_neg = num_pos_neg(case)
        seen["image without objects"] += int(((case["gt_labels"] > 0).sum(1) == 0).sum())
        seen["num_neg capped by the background"] += int((case["kwargs"]["neg_pos_ratio"] * num_pos > num_neg).sum())
        seen["no negatives"] += int(((num_neg == 0) & (num_pos > 0)).sum())
        seen["threshold positives"] += int((num_pos > (case["gt_labels"] > 0).sum(1)).sum())
    assert all(n >= 3 for n in seen.values()), seen


def test_loss_equals_reference_with_tied_losses(both_paths):
    cut_in_ties = 0
    for seed in range(12):
        case = random_case(seed)
        b, p, c = case["outputs"]["conf"].shape
        g = torch.Generator().manual_seed(seed)
        # the same logits at every prior: all background losses tie, any num_neg of them is a valid choice
        case["outputs"]["conf"] = torch.randn(c, generator=g).expand(b, p, c).clone()
        assert_equals_reference(case, ties=True)
        # logits on a coarse grid: groups of ties, cut at the num_neg-th
        case["outputs"]["conf"] = torch.randint(-2, 3, (b, p, c), generator=g).float()
        assert_equals_reference(case, ties=True)
        num_pos, num_neg = num_pos_neg(case)
        cut_in_ties += int(((num_neg > 0) & (num_neg < p - num_pos)).sum())
    assert cut_in_ties >= 5


@pytest.mark.parametrize("padding", ["junk", "nan", "inf"])
def test_batch_without_positives_equals_reference(padding, both_paths):
    case = random_case(1)
    case["gt_labels"] = torch.zeros_like(case["gt_labels"])  # every row padding
    case["gt_boxes"] = {
        "junk": case["gt_boxes"],
        "nan": torch.full_like(case["gt_boxes"], float("nan")),
        "inf": torch.full_like(case["gt_boxes"], float("inf")),
    }[padding]
    out, loc_grad, conf_grad = loss_and_grads(lambda *a: ours(*a, **case["kwargs"]), case)
    assert out["loc"].item() == 0.0 and out["conf"].item() == 0.0
    assert not loc_grad.any() and not conf_grad.any()
    assert_equals_reference(case)


@pytest.mark.parametrize("padding", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_padding_boxes_do_not_leak(padding):
    # the target of an unmatched prior is encoded from gt row 0, which is padding in an image without objects
    for seed in range(8):
        case = random_case(seed)
        case["gt_boxes"] = torch.where(case["gt_labels"][..., None] > 0, case["gt_boxes"], padding)
        assert_equals_reference(case)


def test_overflowing_box_predictions_off_the_positives_are_ignored():
    # fp16 outputs can overflow to inf; as before, only the positives' box predictions count
    for seed in range(8):
        case = random_case(seed)
        pos = match(case["gt_boxes"], case["gt_labels"], case["priors"], case["kwargs"]["iou_threshold"]) >= 0
        case["outputs"]["loc"] = torch.where(pos[..., None], case["outputs"]["loc"], float("inf"))
        assert_equals_reference(case)


def test_every_prior_positive_leaves_no_negatives(both_paths):
    case = random_case(9)  # one image without objects, two with
    # IoU >= 0 matches every prior of an image with objects
    case["kwargs"] = {"iou_threshold": 0.0, "neg_pos_ratio": 3.0}
    num_pos, num_neg = num_pos_neg(case)
    has_objects = (case["gt_labels"] > 0).any(dim=1)
    assert torch.equal(num_pos, has_objects * case["priors"].shape[0]) and torch.equal(
        num_neg, torch.zeros_like(num_neg)
    )
    assert has_objects.any() and not has_objects.all()
    assert_equals_reference(case)


# --- no host sync: fixed shapes all the way ---


def test_match_and_loss_compile_to_one_graph():
    """A proxy for "no host sync" on CPU: a data-dependent shape or a value read back (``nonzero``,
    ``int(tensor)``) breaks the graph, which ``fullgraph=True`` turns into an error."""
    case = random_case(5)
    criterion = MultiBoxLoss(**case["kwargs"])

    def fn(loc, conf, gt_boxes, gt_labels, priors):
        out = criterion({"loc": loc, "conf": conf}, gt_boxes, gt_labels, priors)
        return out["loc"], out["conf"]

    def loss_and_grads_of(f):
        loc = case["outputs"]["loc"].clone().requires_grad_()
        conf = case["outputs"]["conf"].clone().requires_grad_()
        loc_loss, conf_loss = f(loc, conf, case["gt_boxes"], case["gt_labels"], case["priors"])
        return (loc_loss.detach(), conf_loss.detach(), *torch.autograd.grad(loc_loss + conf_loss, (loc, conf)))

    torch._dynamo.reset()
    try:
        compiled = loss_and_grads_of(torch.compile(fn, fullgraph=True, backend="aot_eager"))
        # the proxy can fail: the pre-rewrite loss (nonzero, int(num_neg.max())) does not compile to one graph
        with pytest.raises(torch._dynamo.exc.TorchDynamoException):
            torch.compile(reference_multibox_loss, fullgraph=True, backend="aot_eager")(
                case["outputs"], case["gt_boxes"], case["gt_labels"], case["priors"], **case["kwargs"]
            )
    finally:
        torch._dynamo.reset()
    for got, want in zip(compiled, loss_and_grads_of(fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_match_and_loss_do_not_sync_on_cuda():
    case = random_case(6)
    loc = case["outputs"]["loc"].cuda().requires_grad_()
    conf = case["outputs"]["conf"].cuda().requires_grad_()
    gt_boxes, gt_labels, priors = case["gt_boxes"].cuda(), case["gt_labels"].cuda(), case["priors"].cuda()
    criterion = MultiBoxLoss(**case["kwargs"])

    def step():
        match(gt_boxes, gt_labels, priors)
        out = criterion({"loc": loc, "conf": conf}, gt_boxes, gt_labels, priors)
        (out["loc"] + out["conf"]).backward()
        return out

    step()  # one-time initialisation (kernels, handles) may synchronise; the steps after must not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = reference_multibox_loss(
        case["outputs"], case["gt_boxes"], case["gt_labels"], case["priors"], **case["kwargs"]
    )
    torch.testing.assert_close(out["loc"].cpu(), ref["loc"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["conf"].cpu(), ref["conf"], rtol=1e-4, atol=1e-5)
