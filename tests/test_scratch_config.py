"""configs/ssd300_vgg16_bn_scratch_voc0712.yaml: the ScratchDet from-scratch recipe.

The numbers are the ones its comments cite: KimSoybean/ScratchDet caffe/ssd_pascal.py (batch 128 on 4 GPUs,
base_lr worked out to 0.05, steps 40k/75k/90k, 100k iterations, weight decay 5e-4, momentum 0.9, no decay on
BN parameters) and the authors' mmdetection port (linear warmup, 500 iterations from 1/3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ssd.config import BN_BLOCKS, is_user_set, load_config
from ssd.engine.bn import MIN_BN_BATCH, small_batch_warning
from ssd.engine.optim import build_optimizer, lr_factor
from ssd.model.ssd import build_ssd

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ssd300_vgg16_bn_scratch_voc0712.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def model(cfg):
    return build_ssd(cfg.model)


def test_trains_from_scratch(cfg):
    assert cfg.model.init is None and cfg.model.init_backbone is None
    assert not is_user_set(cfg, "model.init") and not is_user_set(cfg, "model.init_backbone")
    for line in CONFIG.read_text().splitlines():  # no init key anywhere in the file
        assert not line.lstrip().startswith(("init:", "init_backbone:")), line


def test_bn_in_every_block_and_the_heads(cfg):
    assert cfg.model.batch_norm == list(BN_BLOCKS)
    assert "heads" in cfg.model.batch_norm and cfg.model.dropout == 0.0
    assert (cfg.model.arch, cfg.model.input_size, cfg.model.num_classes) == ("ssd300", 300, 21)


def test_recipe_numbers_match_the_cited_sources(cfg):
    t = cfg.train
    # caffe/ssd_pascal.py: base_lr = 0.00004 * 50 for batch 1, scaled by 25 / loc_weight (VALID normalisation,
    # loc_weight = (neg_pos_ratio + 1) / 4 = 1.0); the paper's best VGG16-BN lr and mmdet's lr=5e-2 agree
    assert t.lr == pytest.approx(0.00004 * 50 * 25 / ((3.0 + 1.0) / 4.0)) == pytest.approx(0.05)
    assert (t.optimizer, t.momentum, t.weight_decay, t.no_decay_bn_bias) == ("sgd", 0.9, 0.0005, True)
    assert t.batch_size == 128 and t.max_iter == 100000
    assert (t.schedule, t.steps, t.gamma) == ("multistep", [40000, 75000, 90000], 0.1)
    assert t.warmup_iters == 500 and t.warmup_factor == pytest.approx(1 / 3)
    assert (t.bn, t.checkpoint_period, t.eval_period) == ("train", 5000, 5000)
    assert cfg.eval.metric == "voc07"
    assert cfg.data.train.root == ["data/VOCdevkit/VOC2007", "data/VOCdevkit/VOC2012"]
    assert (cfg.data.train.split, cfg.data.val.root, cfg.data.val.split) == (
        "trainval",
        "data/VOCdevkit/VOC2007",
        "test",
    )


def test_lr_schedule_as_cited(cfg):
    t = cfg.train
    assert lr_factor(0, t) == pytest.approx(1 / 3)  # mmdet's linear warmup starts at warmup_ratio 1/3
    assert lr_factor(250, t) == pytest.approx(2 / 3)
    for it, factor in [(500, 1.0), (39999, 1.0), (40000, 0.1), (75000, 0.01), (90000, 0.001), (99999, 0.001)]:
        assert lr_factor(it, t) == pytest.approx(factor), it


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_global_batch_splits_into_enough_images_per_process(cfg, gpus):
    per_process = cfg.train.batch_size // gpus
    assert per_process * gpus == cfg.train.batch_size and per_process >= MIN_BN_BATCH
    assert small_batch_warning(cfg.train.bn, gpus, per_process) is None
    assert cfg.train.batch_size // 4 == 32  # the released script: 4 GPUs x 32


def test_model_has_a_bn_after_every_conv(model):
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # 13 trunk convs + fc6/fc7 + 4 extras x 2 + 6 sources x (loc, conf)
    assert len(convs) == len(bns) == 13 + 2 + 8 + 12
    assert all(m.bias is None for _, m in convs), [n for n, m in convs if m.bias is not None]
    heads = [n for n, _ in convs if n.startswith("head.")]
    assert len(heads) == 12
    for name in heads:  # loc.i / conf.i keep their names; their BN is the sibling loc_bn.i / conf_bn.i
        kind, i = name.split(".")[1:]
        assert f"head.{kind}_bn.{i}" in bns


def test_model_runs_and_optimizer_groups(cfg, model):
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 300, 300))
    assert out["loc"].shape == (1, 8732, 4) and out["conf"].shape == (1, 8732, 21)
    opt = build_optimizer(cfg.train, model)
    decays = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert set(decays) == {0.0005, 0.0}  # convs decay; BN gamma/beta do not (Caffe decay_mult 0)
    bn_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert decays[0.0] == bn_params
