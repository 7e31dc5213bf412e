"""The SSD network: output shapes, BatchNorm placement, dropout, L2Norm, config errors, a few training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssd.config import BN_ALL, BN_BLOCKS, ConfigError, ModelConfig, from_dict
from ssd.loss import MultiBoxLoss
from ssd.model.ssd import build_ssd
from ssd.model.vgg import ConvBlock, L2Norm
from ssd.ops.boxes import pad_targets


def conv_blocks(model: nn.Module) -> dict[str, ConvBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ConvBlock)}


def test_forward_shapes(make_tiny_config):
    torch.manual_seed(0)
    model = build_ssd(make_tiny_config(num_classes=5)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 128, 128))
    assert set(out) == {"loc", "conf"}
    assert out["loc"].shape == (3, 1524, 4)
    assert out["conf"].shape == (3, 1524, 5)
    assert out["loc"].shape[1] == model.priors.shape[0]
    assert torch.isfinite(out["loc"]).all() and torch.isfinite(out["conf"]).all()


def test_fc6_dilation_changes_only_the_sampling(make_tiny_config):
    paper, small = build_ssd(make_tiny_config()), build_ssd(make_tiny_config(fc6_dilation=2))
    assert paper.backbone.fc6.conv.dilation == (6, 6) and paper.backbone.fc6.conv.padding == (6, 6)
    assert small.backbone.fc6.conv.dilation == (2, 2) and small.backbone.fc6.conv.padding == (2, 2)
    # same tensors (checkpoints load either way), same 8x8 fc7 map at 128 px
    assert {k: v.shape for k, v in paper.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    small.load_state_dict(paper.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = paper.eval().backbone(x)[1], small.eval().backbone(x)[1]
    assert a.shape == b.shape == (1, paper.backbone.out_channels[1], 8, 8)
    assert not torch.allclose(a, b)


def test_batch_norm_all_drops_conv_bias(make_tiny_config):
    model = build_ssd(make_tiny_config(batch_norm="all"))
    blocks = conv_blocks(model)
    assert len(blocks) == 15 + 2 * 3  # VGG trunk (13 conv + fc6 + fc7) + 2 per extra layer
    for name, block in blocks.items():
        assert isinstance(block.bn, nn.BatchNorm2d), name
        assert block.conv.bias is None, name
    # every other conv (the heads) keeps its bias
    others = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.endswith(".conv")]
    assert len(others) == 2 * 5  # loc + conf per level
    assert all(m.bias is not None for _, m in others)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21


def test_batch_norm_selected_blocks_only(make_tiny_config):
    model = build_ssd(make_tiny_config(batch_norm=["extras", "conv1"]))
    bn_names = sorted(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    expected = ["backbone.conv1.0.bn", "backbone.conv1.1.bn"] + [
        f"extras.{i}.{j}.bn" for i in range(3) for j in range(2)
    ]
    assert bn_names == sorted(expected)
    for name, block in conv_blocks(model).items():
        has_bn = name.startswith(("backbone.conv1.", "extras."))
        assert (block.conv.bias is None) == has_bn, name
        assert isinstance(block.bn, nn.BatchNorm2d if has_bn else nn.Identity), name
    # names stay stable whatever BN is enabled: the plain model has the same conv keys
    plain = build_ssd(make_tiny_config())
    conv_keys = {k for k in plain.state_dict() if k.endswith(".conv.weight")}
    assert conv_keys and conv_keys <= set(model.state_dict())


def test_batch_norm_config_values():
    cfg = from_dict(ModelConfig, {"batch_norm": ["conv5", "fc"]}, "model")
    assert cfg.batch_norm == ["conv5", "fc"]
    assert ModelConfig(batch_norm="all").batch_norm == list(BN_ALL)
    assert "heads" in BN_BLOCKS and "heads" not in BN_ALL
    assert ModelConfig(batch_norm=["heads", "all"]).batch_norm == [*BN_ALL, "heads"]
    assert ModelConfig(batch_norm=["heads", "fc"]).batch_norm == ["fc", "heads"]
    assert ModelConfig(batch_norm="none").batch_norm == []
    with pytest.raises(ConfigError, match="did you mean 'extras'"):
        ModelConfig(batch_norm=["extra"])


def test_bn_eps_and_momentum_reach_layers(make_tiny_config):
    model = build_ssd(make_tiny_config(batch_norm="all", bn_eps=1e-3, bn_momentum=0.01))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 21
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)


def test_dropout(make_tiny_config):
    model = build_ssd(make_tiny_config(dropout=0.3))
    for name in ("drop6", "drop7"):
        layer = getattr(model.backbone, name)
        assert isinstance(layer, nn.Dropout) and layer.p == 0.3
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    model = build_ssd(make_tiny_config(dropout=0.0))
    assert isinstance(model.backbone.drop6, nn.Identity) and isinstance(model.backbone.drop7, nn.Identity)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    with pytest.raises(ConfigError, match="dropout must be in"):
        ModelConfig(dropout=1.0)


def test_l2norm_scale_init(make_tiny_config):
    model = build_ssd(make_tiny_config())
    assert torch.equal(model.backbone.l2norm.weight.detach(), torch.full((64,), 20.0))  # 512 * 0.125 channels
    model = build_ssd(make_tiny_config(l2norm_scale=10.0))
    assert torch.equal(model.backbone.l2norm.weight.detach(), torch.full((64,), 10.0))


def test_l2norm_output():
    torch.manual_seed(0)
    layer = L2Norm(6, scale=20.0)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 6, 3, 4)
    y = layer(x)
    expected = torch.arange(1.0, 7.0).view(1, 6, 1, 1) * x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(y, expected)
    # unit channel norm once the scale is divided out
    torch.testing.assert_close((y / layer.weight.view(1, 6, 1, 1)).norm(dim=1), torch.ones(2, 3, 4))
    layer.weight.data.fill_(3.0)
    layer.reset_parameters()
    assert torch.equal(layer.weight.detach(), torch.full((6,), 20.0))


def test_l2norm_zero_input_finite_gradient():
    layer = L2Norm(4)
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


def test_l2norm_half_input_does_not_overflow():
    layer = L2Norm(8)
    x = torch.full((1, 8, 1, 1), 300.0, dtype=torch.float16)  # sum of squares 720000 > fp16 max 65504
    y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.full((1, 8, 1, 1), 20.0 / 8**0.5), rtol=1e-3, atol=1e-3)


def test_tiny_bn_model_trains_and_stays_finite(make_tiny_config):
    torch.manual_seed(0)
    model = build_ssd(make_tiny_config(batch_norm="all", num_classes=4, dropout=0.0))
    criterion = MultiBoxLoss()
    images = torch.randn(2, 3, 128, 128)
    gt_boxes, gt_labels = pad_targets(
        [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.5, 0.4, 0.9, 0.95]]), torch.tensor([[0.2, 0.3, 0.7, 0.8]])],
        [torch.tensor([1, 3]), torch.tensor([2])],
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model.train()
    losses = []
    for _ in range(6):
        terms = criterion(model(images), gt_boxes, gt_labels, model.priors)
        loss = terms["loc"] + terms["conf"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it fits the single batch (~43 -> ~7 over seeds)
    bn = model.backbone.conv1[0].bn
    assert bn.num_batches_tracked.item() == 6 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    model.eval()
    with torch.no_grad():
        out = model(images)
        terms = criterion(out, gt_boxes, gt_labels, model.priors)
    assert torch.isfinite(out["loc"]).all() and torch.isfinite(out["conf"]).all()
    assert torch.isfinite(terms["loc"]) and torch.isfinite(terms["conf"])


def test_too_small_input_raises_clear_error():
    with pytest.raises(ValueError, match="model.input_size 64 is too small"):
        build_ssd(ModelConfig(width=0.125, input_size=64))  # ssd300 extras need a 3x3 map at the end


def test_unknown_config_key_suggests_close_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.widht' \(did you mean model.width\?\)"):
        from_dict(ModelConfig, {"widht": 0.5}, "model")
    with pytest.raises(ConfigError, match=r"model.extras\[0\].midd.*did you mean model.extras\[0\].mid\?"):
        from_dict(ModelConfig, {"extras": [{"midd": 1, "out": 2}]}, "model")
    with pytest.raises(ConfigError, match="model.arch: invalid value 'ssd301' \\(did you mean 'ssd300'\\?\\)"):
        from_dict(ModelConfig, {"arch": "ssd301"}, "model")
    with pytest.raises(ConfigError, match="model.width: expected a number"):
        from_dict(ModelConfig, {"width": "wide"}, "model")
