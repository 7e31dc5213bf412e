"""The training step's parts: the on-device skip of a non-finite step (fused optimizers), NHWC batches
from the collate to the network, the cached normalisation constants, and the device rules
(``train.channels_last``, ``cuda:N`` under torchrun). The step inside the real loop (skips, logs,
``max_bad_steps``) is tested in test_train.py; under DDP in test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssd.config import Config, ConfigError, PreprocessConfig, TrainConfig, from_dict
from ssd.data.dataset import collate
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.data.transforms import _normalization_constants, normalize_batch
from ssd.device import resolve_device, use_channels_last
from ssd.engine import train as engine
from ssd.engine.optim import build_optimizer

pytestmark = pytest.mark.numerics


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(2))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_skipped_first_step_leaves_weights_and_optimizer_state_as_if_it_never_happened(optimizer):
    # fused SGD creates its momentum buffers uninitialised in its first step; a first step skipped
    # through found_inf must not leave them holding garbage (prime_momentum gives zeros)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    skipping = small_net()
    skipping(x)  # materialise the lazy layer
    reference = copy.deepcopy(skipping)
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = build_optimizer(cfg, skipping)
    assert all(group["fused"] for group in opt.param_groups)
    before = [p.detach().clone() for p in skipping.parameters()]

    skipping(x).square().sum().backward()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, skipping.parameters(), strict=True))

    # two real steps after the skipped one equal two steps of the unfused optimizer from the start
    ref_opt = (
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=False)
        if optimizer == "sgd"
        else torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=5e-4, foreach=False)
    )
    opt.found_inf = torch.tensor(0.0)
    for model, o in ((skipping, opt), (reference, ref_opt)):
        for _ in range(2):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    for p, q in zip(skipping.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_sgd_gets_zero_momentum_buffers_before_its_first_step():
    opt = build_optimizer(TrainConfig(optimizer="sgd", momentum=0.9), small_net()[:3])
    buffers = [opt.state[p]["momentum_buffer"] for group in opt.param_groups for p in group["params"]]
    assert len(buffers) == 4 and all(not b.any() for b in buffers)
    assert build_optimizer(TrainConfig(optimizer="sgd", momentum=0.0), small_net()[:3]).state == {}  # no momentum: none


def test_normalisation_constants_are_built_once_per_device_and_the_memory_format_is_kept():
    _normalization_constants.cache_clear()
    g = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=g)
    images = collate(
        [
            {"image": im.numpy(), "boxes": [], "labels": [], "image_id": str(i), "orig_size": (16, 16)}
            for i, im in enumerate(hwc)
        ]
    )["images"]
    assert images.shape == (3, 3, 16, 16) and images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, hwc.permute(0, 3, 1, 2))
    for pre in (
        PreprocessConfig(),
        PreprocessConfig(channel_order="bgr", pixel_scale=1.0, mean=[104.0, 117.0, 123.0], std=[1.0, 1.0, 1.0]),
    ):
        out = normalize_batch(images, pre)
        again = normalize_batch(images, pre)
        x = images.double().flip(1) if pre.channel_order == "bgr" else images.double()
        expected = (x * pre.pixel_scale - torch.tensor(pre.mean).double().view(1, 3, 1, 1)) / torch.tensor(
            pre.std
        ).double().view(1, 3, 1, 1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(out, again) and out.is_contiguous(memory_format=torch.channels_last)
    info = _normalization_constants.cache_info()
    assert (info.misses, info.hits) == (2, 2)  # one build per preprocessing, then reused


def test_channels_last_is_a_fixed_per_device_rule():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert [use_channels_last("auto", d) for d in (cpu, cuda, mps)] == [True, True, False]
    assert [use_channels_last("false", d) for d in (cpu, cuda)] == [False, False]
    assert use_channels_last("true", mps)
    # YAML booleans, and run configs written when the key was a boolean, read as the strings
    assert [from_dict(TrainConfig, {"channels_last": v}).channels_last for v in (True, False, "auto")] == [
        "true",
        "false",
        "auto",
    ]
    with pytest.raises(ConfigError, match="train.channels_last: invalid value 'yes'; valid: auto, true, false"):
        from_dict(TrainConfig, {"channels_last": "yes"})


def test_a_fixed_gpu_under_torchrun_is_refused():
    with pytest.raises(ValueError, match=r"train.device cuda:0: under torchrun \(2 processes\) every rank would use"):
        resolve_device("cuda:0", 1, key="train.device", world_size=2)
    assert resolve_device("cpu", 1, world_size=2) == torch.device("cpu")


def tiny_run(tmp_path, **train_options) -> Config:
    """Two iterations of a width-1/8, 64 px model with BN everywhere on 8 generated images."""
    generate_shapes(tmp_path / "shapes", 8, 2, size=64, seed=0)
    dataset = {"format": "voc", "root": str(tmp_path / "shapes"), "classes": SHAPES_CLASSES}
    return from_dict(
        Config,
        {
            "model": {
                "num_classes": 5,
                "input_size": 64,
                "width": 0.125,
                "batch_norm": "all",
                "extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}],
            },
            "data": {"train": {**dataset, "split": "train"}, "val": {**dataset, "split": "val"}, "num_workers": 0},
            "train": {"max_iter": 2, "batch_size": 4, "device": "cpu", "tensorboard": False, **train_options},
        },
    )


@pytest.mark.parametrize("setting", ["auto", "false"])
def test_the_network_sees_the_memory_format_the_setting_gives(setting, tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path, channels_last=setting)
    seen, build_ssd = [], engine.build_ssd

    def build_and_watch(model_cfg):
        model = build_ssd(model_cfg)
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # the first one
        conv.register_forward_pre_hook(lambda m, inputs: seen.append((m.training, inputs[0], m.weight)))
        return model

    monkeypatch.setattr(engine, "build_ssd", build_and_watch)
    engine.train(cfg, tmp_path / "run")
    fmt = torch.channels_last if setting == "auto" else torch.contiguous_format
    training = [(x, w) for is_training, x, w in seen if is_training]
    assert len(training) == 2 and len(seen) > 2  # two steps, then the evaluation
    assert all(x.is_contiguous(memory_format=fmt) and w.is_contiguous(memory_format=fmt) for _, x, w in seen)


def test_frozen_blocks_do_not_train_and_get_no_backward(tmp_path, monkeypatch, caplog):
    # Caffe SSD's recipe: conv1_x and conv2_x frozen when fine-tuning. Their weights and BN statistics stay,
    # they leave the optimizer, no gradient reaches them, and a block nothing loaded is warned about
    cfg = tiny_run(tmp_path, optimizer="sgd", lr=0.01, freeze=["conv1", "conv2"])
    models, build_ssd = [], engine.build_ssd
    monkeypatch.setattr(engine, "build_ssd", lambda model_cfg: models.append(build_ssd(model_cfg)) or models[-1])
    with caplog.at_level("WARNING", logger="ssd.train"):
        engine.train(cfg, tmp_path / "run")
    (model,) = models
    torch.manual_seed(cfg.train.seed)
    start = build_ssd(cfg.model).state_dict()  # the same seed builds the same initial weights
    end = model.state_dict()
    frozen = [k for k in end if k.startswith(("backbone.conv1.", "backbone.conv2."))]
    assert frozen and all(torch.equal(end[k], start[k]) for k in frozen if "num_batches_tracked" not in k)
    assert not torch.equal(end["backbone.conv3.0.conv.weight"], start["backbone.conv3.0.conv.weight"])
    assert all(
        p.grad is None for n, p in model.named_parameters() if n.startswith(("backbone.conv1.", "backbone.conv2."))
    )
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("backbone.conv3."))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]
    trainable = sum(1 for n, p in model.named_parameters() if not n.startswith(("backbone.conv1.", "backbone.conv2.")))
    assert sum(len(g["params"]) for g in state["param_groups"]) == trainable
    warnings = [r.getMessage() for r in caplog.records if "train.freeze" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0].startswith("train.freeze: conv1 was not loaded")
    with pytest.raises(ConfigError, match="train.freeze: invalid value 'fc'"):
        from_dict(TrainConfig, {"freeze": ["fc"]})


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_step_leaves_bn_statistics_and_the_weights_average_bit_identical(make_tiny_config, fused):
    """An infinity in one image makes the loss non-finite: the step is skipped, and the BN running
    statistics its train-mode forward moved are put back on the device, the EMA left as it was (its
    counter advances). fused: the on-device skip (the CUDA path's code); unfused: the host decision."""
    from ssd.config import LossConfig
    from ssd.engine.ema import ModelEma
    from ssd.engine.step import TrainStep
    from ssd.loss import build_loss
    from ssd.model import build_ssd

    torch.manual_seed(0)
    model_cfg = make_tiny_config(batch_norm=["all", "heads"], input_size=64, extras=[{"mid": 256, "out": 512}])
    model = build_ssd(model_cfg).train()
    optimizer = build_optimizer(TrainConfig(optimizer="adamw", lr=1e-3), model)
    for group in optimizer.param_groups:
        group["fused"] = fused
    ema = ModelEma(model, decay=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = TrainStep(
        model, model, build_loss(LossConfig(), model_cfg), optimizer, scaler, None, TrainConfig(), False, ema
    )
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    batch = {
        "boxes": torch.tensor([[[0.1, 0.1, 0.6, 0.6]]] * 4),
        "labels": torch.ones(4, 1, dtype=torch.int64),
        "image_ids": ["a", "b", "c", "d"],
    }
    poisoned = images.clone()
    poisoned[1, :, 5, 5] = float("inf")

    def state():
        return [t.clone() for t in (*model.state_dict().values(), *ema.state_dict().values())]

    step.forward_images = lambda net, _: net(images)
    step(batch, 1)  # a normal step: weights, BN statistics and the average all move
    before = state()
    step.forward_images = lambda net, _: net(poisoned)
    step(batch, 2)
    after = state()
    assert len(step.bn_buffers) == 3 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert ema.updates == 2
    step.forward_images = lambda net, _: net(images)
    step(batch, 3)
    assert not all(torch.equal(a, b) for a, b in zip(after, state(), strict=True))  # training goes on
    assert [float(record[2]) for _, record, _ in step.pending] == [0.0, 1.0, 0.0]  # the middle one skipped
