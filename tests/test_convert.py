"""Weight converters: torchvision ssd300_vgg16, ssd.pytorch (amdegroot), lufficc/SSD, ImageNet VGG16.

Every foreign model here is the real torchvision module with random weights (nothing is downloaded);
the ssd.pytorch / lufficc layouts are made by renaming torchvision keys with the mapping documented
in REFERENCE.md, written out again here so the test does not reuse the converter's own tables.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import _meta
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSDHead
from torchvision.ops import box_convert, box_iou

from ssd.checkpoint import CheckpointError, checkpoint_model_config, load_checkpoint, load_state_strict
from ssd.classes import COCO_CLASSES, VOC_CLASSES
from ssd.config import ModelConfig, PreprocessConfig
from ssd.convert import convert_caffe_port, convert_file, convert_torchvision, convert_vgg
from ssd.convert.caffe_ports import LAYOUTS, caffe_port_key_map
from ssd.model import build_ssd
from ssd.postprocess import PostProcessor

pytestmark = pytest.mark.numerics

SSD300_GRID = [38, 19, 10, 5, 3, 1]
SSD300_ANCHORS = [4, 6, 6, 6, 4, 4]
SSD300_SOURCE_CHANNELS = [512, 1024, 512, 256, 256, 256]


# --- helpers -------------------------------------------------------------------------------------


def preprocess(images: Tensor, pp: PreprocessConfig) -> Tensor:
    """RGB images in [0, 1] -> network input, exactly as the checkpoint's preprocess config says."""
    x = images if pp.channel_order == "rgb" else images.flip(1)
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    return (x * 255.0 * pp.pixel_scale - mean) / std


def randomise_biases(module: nn.Module, std: float) -> None:
    """torchvision initialises every conv bias to 0, so a mis-mapped bias would go unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, std)


def model_from_ckpt(ckpt: dict) -> nn.Module:
    model = build_ssd(checkpoint_model_config(ckpt))
    load_state_strict(model, ckpt["model"], "test")
    return model.eval()


def torchvision_to_caffe_port(
    state: dict[str, Tensor], vgg: str, extras: str, l2norm: str, loc: str, conf: str
) -> dict[str, Tensor]:
    """torchvision ssd300_vgg16 keys -> ssd.pytorch / lufficc keys (REFERENCE.md, inverted)."""
    trunk_tail = {"extra.0.1": 24, "extra.0.3": 26, "extra.0.5": 28, "extra.0.7.1": 31, "extra.0.7.3": 33}
    out = {}
    for key, value in state.items():
        if key == "backbone.scale_weight":
            out[l2norm] = value
            continue
        module, param = key.rsplit(".", 1)
        if m := re.fullmatch(r"backbone\.features\.(\d+)", module):
            assert int(m[1]) <= 21
            new = f"{vgg}{m[1]}"
        elif module.removeprefix("backbone.") in trunk_tail:
            new = f"{vgg}{trunk_tail[module.removeprefix('backbone.')]}"
        elif m := re.fullmatch(r"backbone\.extra\.(\d+)\.([02])", module):
            j = int(m[1]) - 1
            new = f"{extras}{2 * j + int(m[2]) // 2}"
        elif m := re.fullmatch(r"head\.regression_head\.module_list\.(\d+)", module):
            new = f"{loc}{m[1]}"
        elif m := re.fullmatch(r"head\.classification_head\.module_list\.(\d+)", module):
            new = f"{conf}{m[1]}"
        else:
            raise AssertionError(f"unmapped torchvision key {key}")
        out[f"{new}.{param}"] = value
    assert len(out) == len(state)
    return out


AMDEGROOT_KEYS = dict(vgg="vgg.", extras="extras.", l2norm="L2Norm.weight", loc="loc.", conf="conf.")
LUFFICC_KEYS = dict(
    vgg="backbone.vgg.",
    extras="backbone.extras.",
    l2norm="backbone.l2_norm.weight",
    loc="box_head.predictor.reg_headers.",
    conf="box_head.predictor.cls_headers.",
)


def caffe_port_priors(
    image_size: int,
    grid: list[int],
    steps: list[float],
    min_sizes: list[float],
    max_sizes: list[float],
    ratios: list[list[int]],
) -> Tensor:
    """The prior loop of ssd.pytorch's / lufficc's ``PriorBox`` written out plainly (cxcywh, clamped)."""
    rows = []
    for k, f in enumerate(grid):
        f_k = image_size / steps[k]
        s_k = min_sizes[k] / image_size
        s_prime = math.sqrt(s_k * max_sizes[k] / image_size)
        for i, j in itertools.product(range(f), repeat=2):
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            rows += [[cx, cy, s_k, s_k], [cx, cy, s_prime, s_prime]]
            for ar in ratios[k]:
                r = math.sqrt(ar)
                rows += [[cx, cy, s_k * r, s_k / r], [cx, cy, s_k / r, s_k * r]]
    return torch.tensor(rows, dtype=torch.float64).clamp(0.0, 1.0).float()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv():
    """torchvision ssd300_vgg16 (91 classes) with random weights scaled so its outputs are O(1).

    With torchvision's own random init the class logits have std ~3.4 (max ~34): softmax saturates
    at 1.0 and the top detections are all exact ties, which would make the comparison meaningless.
    """
    torch.manual_seed(0)
    model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    randomise_biases(model, 0.05)
    with torch.no_grad():
        model.backbone.scale_weight.uniform_(15.0, 25.0)  # per-channel, so a permuted L2Norm would show
        for m in model.head.classification_head.module_list:
            m.weight.mul_(0.4)
        for m in model.head.regression_head.module_list:
            m.weight.mul_(0.25)
    return model


@pytest.fixture(scope="module")
def tv_ckpt(tv):
    return convert_torchvision(tv.state_dict())


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tv_input(images):
    """One image normalised as torchvision does (RGB, (x - mean) * 255): the input of the head tests."""
    mean = torch.tensor([0.48235, 0.45882, 0.40784]).view(1, 3, 1, 1)
    return (images[:1] - mean) * 255.0


@pytest.fixture(scope="module")
def tv_head21():
    """A 21-class (VOC) torchvision SSD head: what an ssd.pytorch / lufficc VOC model carries."""
    torch.manual_seed(2)
    head = SSDHead(SSD300_SOURCE_CHANNELS, SSD300_ANCHORS, 21).eval()
    randomise_biases(head, 0.1)
    return head


@pytest.fixture(scope="module")
def tv21_state(tv, tv_head21):
    """torchvision-layout state_dict of a 21-class SSD300: tv's backbone + the 21-class head."""
    state = {k: v for k, v in tv.state_dict().items() if k.startswith("backbone.")}
    state.update({f"head.{k}": v for k, v in tv_head21.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def tv21_out(tv, tv_head21, tv_input):
    with torch.no_grad():
        return tv_head21(list(tv.backbone(tv_input).values()))


# --- torchvision ---------------------------------------------------------------------------------


def test_torchvision_detections_match(tv, tv_ckpt, images):
    model = model_from_ckpt(tv_ckpt)
    cfg = checkpoint_model_config(tv_ckpt)
    with torch.no_grad():
        expected = tv(list(images))
        out = model(preprocess(images, cfg.preprocess))
    # the random weights give informative outputs: logits O(1)-O(10), not saturated
    assert 0.5 < out["conf"].std().item() < 10.0
    assert out["conf"].abs().max().item() < 50.0
    got = PostProcessor()(out, model.priors, (300, 300), [(300, 300)] * 2)
    for e, g in zip(expected, got, strict=True):
        e_boxes, e_scores, e_labels = e["boxes"][:100], e["scores"][:100], e["labels"][:100]
        assert len(e_boxes) == 100
        # not degenerate: spread scores, boxes of real size, more than one class
        assert e_scores[0] < 0.9999 and e_scores[0] - e_scores[-1] > 0.05
        assert ((e_boxes[:, 2:] - e_boxes[:, :2]) > 1.0).all()
        assert e_labels.unique().numel() >= 3
        found = (
            (box_iou(e_boxes, g["boxes"]) >= 0.999)
            & (e_labels[:, None] == g["labels"][None])
            & ((e_scores[:, None] - g["scores"][None]).abs() <= 1e-4)
        ).any(dim=1)
        assert found.float().mean().item() >= 0.99, f"{int((~found).sum())} of torchvision's top 100 not found"
        assert len(g["boxes"]) == len(e["boxes"]) == 200


def test_torchvision_checkpoint_config(tv, tv_ckpt):
    cfg = checkpoint_model_config(tv_ckpt)
    assert tv_ckpt["format"] == "ssd" and tv_ckpt["source"] == "torchvision"
    assert cfg.arch == "ssd300" and cfg.input_size == 300 and cfg.num_classes == 91
    assert cfg.priors.clip == "wh"
    assert cfg.priors.scales == pytest.approx([0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])
    assert tv_ckpt["classes"] == _meta._COCO_CATEGORIES[1:]
    pp = cfg.preprocess
    assert pp.channel_order == "rgb" and pp.resize == "normalize_then_bilinear"
    # the network input must be torchvision's: (x - image_mean) / image_std on [0, 1] RGB
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    tv_mean = torch.tensor(tv.transform.image_mean).view(1, 3, 1, 1)
    tv_norm = (x - tv_mean) / torch.tensor(tv.transform.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x, pp), tv_norm, rtol=1e-5, atol=1e-4)
    # every tensor converted, none invented: 35,641,826 parameters (REFERENCE.md)
    num_params = sum(v.numel() for v in tv_ckpt["model"].values())
    assert num_params == sum(v.numel() for v in tv.state_dict().values()) == 35_641_826


def test_torchvision_priors_equal_anchors(tv, tv_ckpt):
    model = build_ssd(checkpoint_model_config(tv_ckpt))
    image_list = ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)])
    anchors_xyxy = tv.anchor_generator(image_list, [torch.zeros(1, 1, s, s) for s in SSD300_GRID])[0]
    assert model.priors.shape == anchors_xyxy.shape == (8732, 4)
    torch.testing.assert_close(box_convert(model.priors, "cxcywh", "xyxy") * 300, anchors_xyxy, rtol=0, atol=1e-4)
    # torchvision clamps only w, h: the largest 3x3 / 1x1 priors stick out of the image
    assert anchors_xyxy.min() < -10 and anchors_xyxy.max() > 310


def test_torchvision_unexpected_or_missing_key(tv):
    state = tv.state_dict()
    extra = dict(state, **{"backbone.extra.5.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=re.escape("backbone.extra.5.0.weight")):
        convert_torchvision(extra)
    missing = {k: v for k, v in state.items() if k != "backbone.extra.2.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: .*backbone\.extra\.2\.2\.bias"):
        convert_torchvision(missing)


def test_torchvision_wrong_number_of_heads(tv):
    state = {k: v for k, v in tv.state_dict().items() if not re.search(r"module_list\.5\.", k)}
    with pytest.raises(ValueError, match="found 5"):
        convert_torchvision(state)


def test_load_checkpoint_on_raw_torchvision_file_suggests_convert(tv, tmp_path):
    path = tmp_path / "ssd300_vgg16_coco.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(CheckpointError, match="ssd convert") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    # ... and the suggested conversion of that very file works
    ckpt = convert_file("torchvision", path)
    assert ckpt["model"].keys() == convert_torchvision(tv.state_dict())["model"].keys()


# --- ssd.pytorch (amdegroot) and lufficc ----------------------------------------------------------


def test_amdegroot_heads_match_torchvision(tv21_state, tv21_out, tv_input):
    state = torchvision_to_caffe_port(tv21_state, **AMDEGROOT_KEYS)
    assert {"vgg.33.weight", "L2Norm.weight", "extras.7.bias", "loc.5.weight", "conf.5.bias"} <= state.keys()
    assert [state[f"conf.{i}.weight"].shape[0] for i in range(6)] == [84, 126, 126, 126, 84, 84]
    ckpt = convert_caffe_port(state, "amdegroot")
    with torch.no_grad():
        out = model_from_ckpt(ckpt)(tv_input)
    torch.testing.assert_close(out["loc"], tv21_out["bbox_regression"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["conf"], tv21_out["cls_logits"], rtol=0, atol=1e-5)


def test_amdegroot_checkpoint_config(tv21_state):
    ckpt = convert_caffe_port(torchvision_to_caffe_port(tv21_state, **AMDEGROOT_KEYS), "amdegroot")
    cfg = checkpoint_model_config(ckpt)
    assert ckpt["source"] == "amdegroot" and ckpt["classes"] == VOC_CLASSES
    assert cfg.arch == "ssd300" and cfg.num_classes == 21
    pp = cfg.preprocess
    assert (pp.channel_order, pp.pixel_scale, pp.mean, pp.std) == ("bgr", 1.0, [104.0, 117.0, 123.0], [1.0, 1.0, 1.0])
    assert cfg.priors.clip == "corners"
    expected = caffe_port_priors(
        300,
        SSD300_GRID,
        [8, 16, 32, 64, 100, 300],
        [30, 60, 111, 162, 213, 264],
        [60, 111, 162, 213, 264, 315],
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    )
    torch.testing.assert_close(build_ssd(cfg).priors, expected, rtol=0, atol=1e-6)


def test_amdegroot_file_with_dataparallel_prefix(tv21_state, tmp_path):
    state = torchvision_to_caffe_port(tv21_state, **AMDEGROOT_KEYS)
    path = tmp_path / "ssd300_mAP_77.43_v2.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    ckpt = convert_file("amdegroot", path)
    direct = convert_caffe_port(state, "amdegroot")["model"]
    assert ckpt["model"].keys() == direct.keys()
    assert all(torch.equal(ckpt["model"][k], direct[k]) for k in direct)


def test_amdegroot_unexpected_or_missing_key(tv21_state):
    state = torchvision_to_caffe_port(tv21_state, **AMDEGROOT_KEYS)
    with pytest.raises(CheckpointError, match=r"unexpected keys: vgg\.35\.weight"):
        convert_caffe_port(dict(state, **{"vgg.35.weight": torch.zeros(1)}), "amdegroot")
    with pytest.raises(CheckpointError, match=r"missing keys: extras\.3\.bias"):
        convert_caffe_port({k: v for k, v in state.items() if k != "extras.3.bias"}, "amdegroot")


def test_amdegroot_wrong_number_of_heads(tv21_state):
    state = torchvision_to_caffe_port(tv21_state, **AMDEGROOT_KEYS)
    state = {k: v for k, v in state.items() if not k.startswith(("loc.5.", "conf.5."))}
    with pytest.raises(ValueError, match="found 5"):
        convert_caffe_port(state, "amdegroot")


def test_lufficc_file_heads_match_torchvision(tv21_state, tv21_out, tv_input, tmp_path):
    state = torchvision_to_caffe_port(tv21_state, **LUFFICC_KEYS)
    path = tmp_path / "vgg_ssd300_voc0712.pth"
    torch.save({"model": state, "iteration": 5}, path)  # lufficc's checkpointer layout
    ckpt = convert_file("lufficc", path)
    cfg = checkpoint_model_config(ckpt)
    assert ckpt["source"] == "lufficc" and ckpt["classes"] == VOC_CLASSES
    pp = cfg.preprocess
    assert (pp.channel_order, pp.pixel_scale, pp.mean, pp.std) == ("rgb", 1.0, [123.0, 117.0, 104.0], [1.0, 1.0, 1.0])
    assert cfg.priors.clip == "corners"
    with torch.no_grad():
        out = model_from_ckpt(ckpt)(tv_input)
    torch.testing.assert_close(out["loc"], tv21_out["bbox_regression"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["conf"], tv21_out["cls_logits"], rtol=0, atol=1e-5)


SSD512_GRID = [64, 32, 16, 8, 4, 2, 1]
SSD512_STEPS = [8, 16, 32, 64, 128, 256, 512]
SSD512_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]


@pytest.fixture(scope="module")
def ssd512_lufficc():
    """Our SSD512's state under lufficc's key names, plus the original state."""
    torch.manual_seed(3)
    model = build_ssd(ModelConfig(arch="ssd512", dropout=0.0))
    randomise_biases(model, 0.1)
    ours = model.state_dict()
    inverse = {v: k for k, v in caffe_port_key_map(LAYOUTS["lufficc"], 7).items()}
    assert inverse.keys() == ours.keys()  # the map covers the model exactly, one-to-one
    return {inverse[k]: v for k, v in ours.items()}, ours


def test_lufficc_ssd512_round_trip(ssd512_lufficc):
    luf, ours = ssd512_lufficc
    assert {"backbone.vgg.33.weight", "backbone.extras.9.bias", "box_head.predictor.cls_headers.6.weight"} <= luf.keys()
    ckpt = convert_caffe_port(luf, "lufficc")
    cfg = checkpoint_model_config(ckpt)
    assert cfg.arch == "ssd512" and cfg.input_size == 512 and cfg.num_classes == 21
    assert ckpt["classes"] == VOC_CLASSES
    assert ckpt["model"].keys() == ours.keys()
    assert all(torch.equal(ckpt["model"][k], ours[k]) for k in ours)
    model = model_from_ckpt(ckpt)
    expected = caffe_port_priors(
        512,
        SSD512_GRID,
        SSD512_STEPS,
        [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8],
        [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.65],
        SSD512_RATIOS,
    )
    torch.testing.assert_close(model.priors, expected, rtol=0, atol=1e-6)


def test_lufficc_ssd512_coco_picks_coco_priors_and_classes(ssd512_lufficc):
    luf, _ = ssd512_lufficc
    luf = dict(luf)
    g = torch.Generator().manual_seed(4)
    for i, anchors in enumerate([4, 6, 6, 6, 6, 4, 4]):
        w = luf[f"box_head.predictor.cls_headers.{i}.weight"]
        luf[f"box_head.predictor.cls_headers.{i}.weight"] = torch.randn(anchors * 81, *w.shape[1:], generator=g) * 0.01
        luf[f"box_head.predictor.cls_headers.{i}.bias"] = torch.randn(anchors * 81, generator=g)
    ckpt = convert_caffe_port(luf, "lufficc")
    cfg = checkpoint_model_config(ckpt)
    assert cfg.arch == "ssd512" and cfg.num_classes == 81
    assert ckpt["classes"] == COCO_CLASSES and len(COCO_CLASSES) == 80
    model = model_from_ckpt(ckpt)  # the COCO head loads strictly into the model the config describes
    expected = caffe_port_priors(
        512,
        SSD512_GRID,
        SSD512_STEPS,
        [20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8],
        [51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72],
        SSD512_RATIOS,
    )
    torch.testing.assert_close(model.priors, expected, rtol=0, atol=1e-6)


def test_convert_file_unknown_format(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="'nope'") as err:
        convert_file("nope", path)
    for kind in ("torchvision", "amdegroot", "lufficc", "vgg16", "vgg16_bn"):
        assert kind in str(err.value)


def test_convert_file_not_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="expected a state_dict") as err:
        convert_file("lufficc", path)
    assert str(path) in str(err.value)


# --- ImageNet VGG16 / VGG16-BN --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(5)
    model = torchvision.models.vgg16(weights=None).eval()
    randomise_biases(model, 0.1)
    return model


@pytest.fixture(scope="module")
def vgg16_bn():
    """vgg16_bn with random conv biases and BN statistics (torchvision's init makes them 0 / 1)."""
    torch.manual_seed(6)
    model = torchvision.models.vgg16_bn(weights=None).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model


OUR_TRUNK_CONVS = [f"conv{b}.{i}" for b, n in zip(range(1, 6), [2, 2, 3, 3, 3], strict=True) for i in range(n)]


def test_vgg16_fc_subsampling(vgg16):
    state = vgg16.state_dict()
    ours = convert_vgg(state, batch_norm=False)["model"]
    fc6_w, fc6_b = state["classifier.0.weight"], state["classifier.0.bias"]
    assert ours["backbone.fc6.conv.weight"].shape == (1024, 512, 3, 3)
    assert torch.equal(ours["backbone.fc6.conv.weight"], fc6_w.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3])
    assert torch.equal(ours["backbone.fc6.conv.bias"], fc6_b[::4])
    assert torch.equal(
        ours["backbone.fc7.conv.weight"], state["classifier.3.weight"][::4, ::4].reshape(1024, 1024, 1, 1)
    )
    assert torch.equal(ours["backbone.fc7.conv.bias"], state["classifier.3.bias"][::4])
    # meaning of the sub-sampling: the reduced fc6, as a 3x3 conv with dilation 3 over a 7x7 pool5
    # map, is the ImageNet fc6 (every 4th unit) looking only at the taps (0, 3, 6) x (0, 3, 6)
    x = torch.randn(2, 512, 7, 7, generator=torch.Generator().manual_seed(8))
    taps = torch.zeros(7, 7)
    taps[::3, ::3] = 1.0
    masked = (fc6_w.reshape(4096, 512, 7, 7) * taps)[::4].flatten(1)
    got = F.conv2d(x, ours["backbone.fc6.conv.weight"], ours["backbone.fc6.conv.bias"], dilation=3).flatten(1)
    torch.testing.assert_close(got, F.linear(x.flatten(1), masked, fc6_b[::4]), rtol=1e-4, atol=1e-4)


def test_vgg16_trunk_keys_and_partial_load(vgg16):
    state = vgg16.state_dict()
    ckpt = convert_vgg(state, batch_norm=False)
    ours = ckpt["model"]
    assert ckpt["kind"] == "backbone" and ckpt["source"] == "vgg16"
    cfg = checkpoint_model_config(ckpt)
    assert cfg.batch_norm == [] and cfg.dropout == 0.0
    pp = cfg.preprocess  # torchvision's ImageNet normalisation on RGB [0, 1]
    assert (pp.channel_order, pp.pixel_scale) == ("rgb", pytest.approx(1 / 255))
    assert pp.mean == pytest.approx([0.485, 0.456, 0.406]) and pp.std == pytest.approx([0.229, 0.224, 0.225])
    assert all(k.startswith("backbone.") for k in ours)
    conv_idx = [i for i, m in enumerate(vgg16.features) if isinstance(m, nn.Conv2d)]
    assert len(conv_idx) == len(OUR_TRUNK_CONVS) == 13
    for i, name in zip(conv_idx, OUR_TRUNK_CONVS, strict=True):
        assert torch.equal(ours[f"backbone.{name}.conv.weight"], state[f"features.{i}.weight"]), name
        assert torch.equal(ours[f"backbone.{name}.conv.bias"], state[f"features.{i}.bias"]), name
    assert len(ours) == 2 * 15
    model = build_ssd(checkpoint_model_config(ckpt))
    result = model.load_state_dict(ours, strict=False)
    assert result.unexpected_keys == []
    expected_missing = {
        k for k in model.state_dict() if k.startswith(("extras.", "head.")) or k == "backbone.l2norm.weight"
    }
    assert set(result.missing_keys) == expected_missing


def test_vgg16_bn_folded_bias_matches_conv_bn(vgg16_bn):
    state = vgg16_bn.state_dict()
    ckpt = convert_vgg(state, batch_norm=True)
    ours = ckpt["model"]
    assert ckpt["source"] == "vgg16_bn"
    assert checkpoint_model_config(ckpt).batch_norm == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    bn_params = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert all(f"backbone.{n}.bn.{p}" in ours for n in OUR_TRUNK_CONVS for p in bn_params)
    assert not any(f"backbone.{n}.conv.bias" in ours for n in OUR_TRUNK_CONVS)
    model = build_ssd(checkpoint_model_config(ckpt)).eval()
    result = model.load_state_dict(ours, strict=False)
    assert result.unexpected_keys == []
    assert not any(k.startswith("backbone.conv") for k in result.missing_keys)

    feats = vgg16_bn.features
    conv_idx = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        # every block: conv(no bias) -> BN == conv(bias) -> BN
        for i, name in zip(conv_idx, OUR_TRUNK_CONVS, strict=True):
            block = model.backbone.get_submodule(name)
            assert block.conv.bias is None
            x = torch.randn(2, feats[i].in_channels, 5, 5, generator=g)
            torch.testing.assert_close(block.bn(block.conv(x)), feats[i + 1](feats[i](x)), rtol=1e-4, atol=1e-4)
        # the whole trunk conv1_1 .. conv5_3 (with pools) on a 32x32 input
        x = torch.rand(1, 3, 32, 32, generator=g)
        b = model.backbone
        y = b.pool(b.conv1(x))
        y = b.pool(b.conv2(y))
        y = b.pool3(b.conv3(y))
        y = b.conv5(b.pool(b.conv4(y)))
        expected = feats[:43](x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_vgg_wrong_flavour_or_missing_fc(vgg16, vgg16_bn):
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*features\.1\.weight"):
        convert_vgg(vgg16_bn.state_dict(), batch_norm=False)
    no_fc = {k: v for k, v in vgg16.state_dict().items() if not k.startswith("classifier.0.")}
    with pytest.raises(CheckpointError, match=r"classifier\.0\.weight"):
        convert_vgg(no_fc, batch_norm=False)
