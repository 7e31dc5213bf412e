"""BatchNorm folding (ssd.fuse): folded outputs equal the BN model's, every BN gone, bad cases refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssd.checkpoint import make_checkpoint, save_checkpoint
from ssd.fuse import fuse_batchnorm
from ssd.inference import Detector
from ssd.model import build_ssd

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from the identity (fresh BN folds to a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.05)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.fixture(scope="module")
def bn_model(make_tiny_config):
    torch.manual_seed(0)
    model = build_ssd(make_tiny_config(batch_norm="all", bn_eps=1e-3))
    randomise_bn(model)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def test_folded_outputs_match_within_1e4_relative(bn_model, images):
    fused = copy.deepcopy(bn_model)
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn_model.modules())
    assert num_bn == 15 + 2 * 3  # 13 VGG convs + fc6 + fc7, and both convs of the 3 extras
    assert fuse_batchnorm(fused) == num_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    blocks = [m for m in fused.modules() if hasattr(m, "conv") and hasattr(m, "bn")]
    assert len(blocks) == num_bn and all(isinstance(b.bn, nn.Identity) and b.conv.bias is not None for b in blocks)
    with torch.no_grad():
        expected, got = bn_model(images), fused(images)
    for key in ("loc", "conf"):
        scale = expected[key].abs().max()
        assert scale > 0.1  # the BN statistics changed the outputs: not a trivially small comparison
        assert (got[key] - expected[key]).abs().max() <= 1e-4 * scale


def test_folding_changes_outputs_compared_to_dropping_bn(bn_model, images):
    """Guards the test above: ignoring the BNs (instead of folding them) gives clearly different outputs."""
    dropped = copy.deepcopy(bn_model)
    for m in dropped.modules():
        for name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, name, nn.Identity())
    with torch.no_grad():
        diff = (dropped(images)["conf"] - bn_model(images)["conf"]).abs().max()
    assert diff > 0.1


def test_model_without_bn_is_unchanged(make_tiny_config, images):
    model = build_ssd(make_tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_batchnorm(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_mode_is_refused(make_tiny_config):
    with pytest.raises(ValueError, match="eval-mode"):
        fuse_batchnorm(build_ssd(make_tiny_config(batch_norm="all")).train())


def test_bn_not_after_a_conv_is_refused_and_nothing_is_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="3"):  # names the offending module
        fuse_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # checked before any folding


def test_detector_folds_by_default_and_no_fuse_keeps_bn(bn_model, tmp_path, make_tiny_config):
    cfg = make_tiny_config(batch_norm="all", bn_eps=1e-3)
    classes = [f"c{i}" for i in range(1, cfg.num_classes)]
    path = tmp_path / "bn.pt"
    save_checkpoint(make_checkpoint(bn_model.state_dict(), cfg, classes, "train"), path)
    fused = Detector.from_checkpoint(path, device="cpu", score_thresh=0.2)
    plain = Detector.from_checkpoint(path, device="cpu", score_thresh=0.2, fuse=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules()) == 21
    image = torch.randint(0, 256, (90, 160, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)).numpy()
    a, b = fused(image), plain(image)
    assert len(b["scores"]) > 20
    assert torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-3)


def test_head_batchnorm_folds_into_the_prediction_convs(make_tiny_config, images):
    """``head.loc_bn.i`` / ``head.conf_bn.i`` fold into their sibling ``head.loc.i`` / ``head.conf.i``."""
    torch.manual_seed(0)
    model = build_ssd(make_tiny_config(batch_norm=["all", "heads"], bn_eps=1e-3))
    randomise_bn(model, seed=2)
    model.eval()
    levels = len(model.head.loc)
    fused = copy.deepcopy(model)
    assert fuse_batchnorm(fused) == 21 + 2 * levels
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    for kind in ("loc", "conf"):
        assert all(isinstance(m, nn.Identity) for m in getattr(fused.head, f"{kind}_bn"))
        # built without bias, BN's beta folded in
        assert all(conv.bias is not None for conv in getattr(fused.head, kind))
        assert all(conv.bias is None for conv in getattr(model.head, kind))
    assert not any(k.startswith(("head.loc_bn", "head.conf_bn")) for k in fused.state_dict())
    with torch.no_grad():
        expected, got = model(images), fused(images)
    for key in ("loc", "conf"):
        scale = expected[key].abs().max()
        assert scale > 0.5
        assert (got[key] - expected[key]).abs().max() <= 1e-5 * scale


def test_head_batchnorm_without_its_conv_is_refused_before_anything_folds(make_tiny_config):
    model = build_ssd(make_tiny_config(batch_norm=["all", "heads"])).eval()
    model.head.conf[0] = nn.Sequential(model.head.conf[0])  # conf_bn.0 no longer has a sibling Conv2d
    with pytest.raises(ValueError, match=r"head\.conf_bn\.0"):
        fuse_batchnorm(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21 + 2 * len(model.head.loc)
    assert model.head.loc[0].bias is None  # nothing folded
