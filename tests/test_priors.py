"""Default boxes: golden values, clip modes, presets, torchvision parity, priors follow real feature maps."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from ssd.config import ConfigError, ModelConfig, PriorConfig
from ssd.convert.torchvision import torchvision_model_config
from ssd.model.priors import (
    caffe_prior_scales,
    default_aspect_ratios,
    make_priors,
    num_priors_per_location,
    resolve_prior_layout,
)
from ssd.model.ssd import build_ssd, feature_sizes
from ssd.ops.boxes import cxcywh_to_xyxy

TV_GRID = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def head_priors(model) -> int:
    """Number of priors the head predicts for, from its conv shapes and the real feature sizes."""
    sizes = feature_sizes(model.backbone, model.extras, model.input_size)
    return sum(conv.out_channels // 4 * h * w for conv, (h, w) in zip(model.head.loc, sizes, strict=True))


@pytest.mark.parametrize("arch, count, levels", [("ssd300", 8732, 6), ("ssd512", 24564, 7)])
def test_preset_prior_counts(arch, count, levels):
    model = build_ssd(ModelConfig(arch=arch))
    assert model.priors.shape == (count, 4)
    assert model.priors.dtype == torch.float32
    assert len(model.head.loc) == levels
    assert head_priors(model) == count
    # non-persistent: rebuilt from the config, never part of a checkpoint
    assert "priors" not in model.state_dict()


def test_golden_tiny_case():
    priors = make_priors([(2, 2)], (100, 100), [0.2], [0.4], [[2.0]], steps=None, clip="none")
    s, s2 = 0.2, math.sqrt(0.2 * 0.4)
    r = math.sqrt(2.0)
    shapes = [(s, s), (s2, s2), (s * r, s / r), (s / r, s * r)]  # square, sqrt(s s'), wide, tall
    centres = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]  # (cx, cy): rows outer, columns inner
    expected = torch.tensor([[cx, cy, w, h] for cx, cy in centres for w, h in shapes], dtype=torch.float32)
    assert priors.shape == (16, 4) and priors.dtype == torch.float32
    torch.testing.assert_close(priors, expected, rtol=0, atol=1e-7)


def test_golden_steps_non_square_and_two_levels():
    # level 0: 1 row x 2 columns of a 100 x 200 (h x w) image, default steps (100, 100 px);
    # level 1: a 1 x 1 map; ratios [2, 3] give 6 boxes per location
    priors = make_priors([(1, 2), (1, 1)], (100, 200), [0.1, 0.5], [0.2, 0.9], [[], [2.0, 3.0]], clip="none")
    assert priors.shape == (2 * 2 + 6, 4)
    s1 = math.sqrt(0.1 * 0.2)
    expected0 = [[0.25, 0.5, 0.1, 0.1], [0.25, 0.5, s1, s1], [0.75, 0.5, 0.1, 0.1], [0.75, 0.5, s1, s1]]
    torch.testing.assert_close(priors[:4], torch.tensor(expected0))
    s, sp, r2, r3 = 0.5, math.sqrt(0.45), math.sqrt(2), math.sqrt(3)
    wh1 = [(s, s), (sp, sp), (s * r2, s / r2), (s / r2, s * r2), (s * r3, s / r3), (s / r3, s * r3)]
    torch.testing.assert_close(priors[4:], torch.tensor([[0.5, 0.5, w, h] for w, h in wh1]))
    # explicit steps: centres at (i + 0.5) * step / size
    stepped = make_priors([(2, 2)], (100, 100), [0.2], [0.4], [[]], steps=[30], clip="none")
    torch.testing.assert_close(stepped[::2, :2], torch.tensor([[0.15, 0.15], [0.45, 0.15], [0.15, 0.45], [0.45, 0.45]]))


def test_clip_modes():
    # step 80 px on a 100 px image puts the second column/row centre at 1.2; s' = sqrt(0.9 * 1.6) = 1.2
    args = ([(2, 2)], (100, 100), [0.9], [1.6], [[2.0]])
    none = make_priors(*args, steps=[80], clip="none")
    wh = make_priors(*args, steps=[80], clip="wh")
    corners = make_priors(*args, steps=[80], clip="corners")
    assert none.max() > 1.2  # unclipped sizes and centres leave [0, 1]
    # "wh" clamps w, h only: centres untouched, sizes in [0, 1]
    torch.testing.assert_close(wh[:, :2], none[:, :2])
    torch.testing.assert_close(wh[:, 2:], none[:, 2:].clamp(0, 1))
    # "corners" clamps all four cxcywh values
    torch.testing.assert_close(corners, none.clamp(0, 1))
    last = 3 * 4  # bottom-right location (cx = cy = 1.2), first box (0.9 x 0.9)
    torch.testing.assert_close(none[last], torch.tensor([1.2, 1.2, 0.9, 0.9]))
    torch.testing.assert_close(wh[last], torch.tensor([1.2, 1.2, 0.9, 0.9]))
    torch.testing.assert_close(corners[last], torch.tensor([1.0, 1.0, 0.9, 0.9]))
    torch.testing.assert_close(wh[1], torch.tensor([0.4, 0.4, 1.0, 1.0]))  # s' = 1.2 clamped
    assert not torch.equal(wh, corners) and not torch.equal(wh, none)


def test_ssd300_preset_sizes_and_caffe_rule():
    layout = resolve_prior_layout(ModelConfig(), 6)
    torch.testing.assert_close(torch.tensor(layout["min_scales"]) * 300, torch.tensor([30.0, 60, 111, 162, 213, 264]))
    torch.testing.assert_close(torch.tensor(layout["max_scales"]) * 300, torch.tensor([60.0, 111, 162, 213, 264, 315]))
    assert layout["steps"] == [8, 16, 32, 64, 100, 300]
    assert layout["aspect_ratios"] == [[2.0], [2.0, 3.0], [2.0, 3.0], [2.0, 3.0], [2.0], [2.0]]
    assert layout["clip"] == "corners"
    scales = torch.tensor(caffe_prior_scales(6), dtype=torch.float64) * 300
    torch.testing.assert_close(scales, torch.tensor([30.0, 60, 111, 162, 213, 264, 315], dtype=torch.float64))


def test_ssd300_golden_priors():
    priors = build_ssd(ModelConfig(width=0.125)).priors  # width does not change the layout
    assert priors.shape == (8732, 4)
    c0 = 4 / 300  # 0.5 * step 8
    torch.testing.assert_close(priors[0], torch.tensor([c0, c0, 0.1, 0.1]))
    torch.testing.assert_close(priors[1], torch.tensor([c0, c0, math.sqrt(30 * 60) / 300, math.sqrt(30 * 60) / 300]))
    torch.testing.assert_close(priors[4], torch.tensor([12 / 300, c0, 0.1, 0.1]))  # next column, same row
    torch.testing.assert_close(priors[38 * 4], torch.tensor([c0, 12 / 300, 0.1, 0.1]))  # next row
    torch.testing.assert_close(priors[38 * 38 * 4], torch.tensor([8 / 300, 8 / 300, 0.2, 0.2]))  # level 1, step 16
    # last prior: 1x1 level, tall box of 264 px, h = 264 sqrt2 / 300 > 1 clamped by "corners"
    torch.testing.assert_close(priors[-1], torch.tensor([0.5, 0.5, 264 / 300 / math.sqrt(2), 1.0]))
    assert priors.min() >= 0 and priors.max() <= 1


def test_torchvision_config_priors_equal_default_box_generator(tv_ssd300, tv_priors):
    images = ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)])
    features = [torch.zeros(1, 1, h, w) for h, w in TV_GRID]
    (anchors_px,) = tv_ssd300.anchor_generator(images, features)  # xyxy pixels
    assert anchors_px.shape == (8732, 4)
    torch.testing.assert_close(cxcywh_to_xyxy(tv_priors) * 300, anchors_px, rtol=0, atol=1e-4)
    # before the xyxy conversion: identical cxcywh default boxes within 1e-6
    grid = tv_ssd300.anchor_generator._grid_default_boxes([list(s) for s in TV_GRID], [300, 300])
    torch.testing.assert_close(tv_priors, grid, rtol=0, atol=1e-6)
    # and the full model built from the torchvision config produces exactly these priors
    torch.testing.assert_close(build_ssd(torchvision_model_config(21)).priors, tv_priors, rtol=0, atol=0)


def test_tiny_priors_follow_real_feature_sizes(make_tiny_config):
    model = build_ssd(make_tiny_config())
    sizes = feature_sizes(model.backbone, model.extras, 128)
    assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    ratios = default_aspect_ratios(5)
    assert ratios == [[2.0], [2.0, 3.0], [2.0, 3.0], [2.0], [2.0]]
    anchors = num_priors_per_location(ratios)
    assert anchors == [4, 6, 6, 4, 4]
    assert sum(h * w * a for (h, w), a in zip(sizes, anchors, strict=True)) == 1524
    assert model.priors.shape == (1524, 4)
    # non-native size: Caffe rule scales, steps = input / feature size
    scales = caffe_prior_scales(5)
    torch.testing.assert_close(torch.tensor(scales), torch.tensor([0.1, 0.2, 0.43, 0.66, 0.89, 1.12]))
    expected = make_priors(sizes, (128, 128), scales[:-1], scales[1:], ratios, steps=None, clip="corners")
    torch.testing.assert_close(model.priors, expected, rtol=0, atol=0)
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 128, 128))
    assert out["loc"].shape == (1, 1524, 4) and out["conf"].shape == (1, 1524, 21)


def test_layout_errors():
    with pytest.raises(ValueError, match="2 feature maps but 1 min sizes"):
        make_priors([(2, 2), (1, 1)], (100, 100), [0.2], [0.4, 0.5], [[2.0], [2.0]])
    cfg = ModelConfig(priors=PriorConfig(scales=[0.1, 0.2, 0.3]))
    with pytest.raises(ConfigError, match="needs 7 values for 6 levels"):
        resolve_prior_layout(cfg, 6)
    cfg = ModelConfig(priors=PriorConfig(aspect_ratios=[[2.0]] * 5))
    with pytest.raises(ConfigError, match="aspect_ratios: 5 lists for 6 feature levels"):
        resolve_prior_layout(cfg, 6)
    with pytest.raises(ConfigError, match="either scales or min_sizes"):
        PriorConfig(scales=[0.1, 0.2], min_sizes=[10.0], max_sizes=[20.0])


def test_explicit_min_max_sizes_and_scales():
    cfg = ModelConfig(input_size=200, priors=PriorConfig(min_sizes=[20.0, 50.0], max_sizes=[50.0, 100.0]))
    layout = resolve_prior_layout(cfg, 2)
    assert layout["min_scales"] == [0.1, 0.25] and layout["max_scales"] == [0.25, 0.5]
    assert layout["steps"] is None  # non-native size: derived from the feature maps
    cfg = ModelConfig(priors=PriorConfig(scales=[0.1, 0.3, 0.6]))
    layout = resolve_prior_layout(cfg, 2)
    assert layout["min_scales"] == [0.1, 0.3] and layout["max_scales"] == [0.3, 0.6]
