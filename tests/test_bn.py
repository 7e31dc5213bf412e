"""BatchNorm in training (ssd.engine.bn): the train / frozen / sync modes, precise BN's population
statistics checked against batch statistics recorded independently with hooks, and the warning
about running statistics that were never updated."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_dict
from torch import nn

import ssd.engine.train as engine
from ssd.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import Config, from_dict
from ssd.data.dataset import build_dataset
from ssd.data.loader import build_dataloader
from ssd.data.shapes import SHAPES_CLASSES
from ssd.data.transforms import build_transforms, normalize_batch
from ssd.engine import bn as bn_tools
from ssd.engine.distributed import DistContext
from ssd.engine.optim import build_optimizer
from ssd.model import build_ssd

SIZE = 64
NUM_BN = 19  # 13 VGG convs + fc6 + fc7 + 2 extras x 2 convs, all with BN


def run_dict(root: Path, **train_options) -> dict:
    """A width-1/8 SSD at 64 px with BN everywhere (maps 8, 4, 2, 1), 40 shapes images, batch 8, SGD."""
    return tiny_run_dict(root, **{"optimizer": "sgd", "lr": 0.01, **train_options})


def config(root: Path, **train_options) -> Config:
    return from_dict(Config, run_dict(root, **train_options))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    return shapes_data(40, 10, SIZE, 5)


def bn_model(shapes: Path) -> nn.Module:
    """The run's model with running statistics moved off their initial values by two train-mode
    batches, and non-trivial affine parameters."""
    torch.manual_seed(0)
    model = build_ssd(config(shapes).model)
    with torch.no_grad():
        for _, m in bn_tools.bn_layers(model):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, SIZE, SIZE))
    return model


# --- modes ------------------------------------------------------------------------------------------


def test_frozen_mode_uses_running_statistics_and_freezes_the_affine_parameters(shapes):
    model = bn_model(shapes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_tools.set_train_mode(model, "frozen")
    layers = bn_tools.bn_layers(model)
    assert len(layers) == NUM_BN and model.training
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for _, m in layers)
    bn_params = {id(p) for _, m in layers for p in m.parameters()}
    assert all(p.requires_grad for p in model.parameters() if id(p) not in bn_params)  # convs still train

    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # running stats untouched
    model.eval()
    torch.testing.assert_close(out["conf"], model(x)["conf"])  # == inference: BN normalises with running stats

    optimizer = build_optimizer(config(shapes).train, model)
    assert not bn_params & {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_train_mode_uses_batch_statistics_and_updates_running_ones(shapes):
    model = bn_model(shapes)
    bn_tools.set_train_mode(model, "train")
    name, first = bn_tools.bn_layers(model)[0]
    assert all(m.training and m.weight.requires_grad for _, m in bn_tools.bn_layers(model))
    before = first.running_mean.clone()
    model(torch.randn(2, 3, SIZE, SIZE))
    assert not torch.equal(first.running_mean, before)


def test_frozen_run_keeps_the_initial_bn_and_trains_the_rest(shapes, tmp_path, caplog):
    model = bn_model(shapes)
    save_checkpoint(
        make_checkpoint(model.state_dict(), config(shapes).model, SHAPES_CLASSES, "train"), tmp_path / "init.pt"
    )
    cfg = config(shapes, bn="frozen")
    cfg.model.init = str(tmp_path / "init.pt")
    with caplog.at_level(logging.WARNING, logger="ssd.engine.bn"):
        engine.train(cfg, tmp_path / "run")
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    init = model.state_dict()
    bn_keys = [k for k in init if ".bn." in k]
    assert len(bn_keys) == 5 * NUM_BN
    assert all(torch.equal(trained[k], init[k]) for k in bn_keys)  # affine and statistics as loaded
    assert not torch.equal(trained["backbone.conv1.0.conv.weight"], init["backbone.conv1.0.conv.weight"])
    assert not torch.equal(trained["head.conf.0.weight"], init["head.conf.0.weight"])
    assert not [r for r in caplog.records if "initial running statistics" in r.getMessage()]


BACKBONE_BN = 15  # conv1_1 .. conv5_3, fc6, fc7; the other 4 are the extras


def test_a_bn_layer_counts_as_trained_when_both_running_statistics_were_loaded(shapes):
    model = build_ssd(config(shapes).model)
    loaded = [
        "backbone.conv1.0.bn.running_mean",
        "backbone.conv1.0.bn.running_var",
        "backbone.conv1.1.bn.running_mean",
        "backbone.conv1.1.bn.weight",
        "extras.0.0.bn.running_var",
        "backbone.conv2.0.conv.weight",
    ]
    assert bn_tools.trained_bn_layers(model, loaded) == ["backbone.conv1.0.bn"]
    assert bn_tools.frozen_bn_layers(model, "frozen", loaded) == ["backbone.conv1.0.bn"]
    assert bn_tools.frozen_bn_layers(model, "train", loaded) == bn_tools.frozen_bn_layers(model, "sync", loaded) == []


def save_init(shapes: Path, path: Path) -> nn.Module:
    """:func:`bn_model` (non-trivial statistics and affine parameters) saved as a training checkpoint."""
    model = bn_model(shapes)
    save_checkpoint(make_checkpoint(model.state_dict(), config(shapes).model, SHAPES_CLASSES, "train"), path)
    return model


def frozen_config(shapes: Path, init: Path, **train_options) -> Config:
    cfg = config(shapes, bn="frozen", **train_options)
    cfg.model.init_backbone = str(init)
    return cfg


def test_frozen_freezes_the_loaded_bn_layers_trains_the_new_ones_and_precise_bn_spares_them(shapes, tmp_path, caplog):
    """``model.init_backbone`` loads the VGG part: its 15 BN layers keep their statistics and affine
    parameters (through precise BN too); the extras' 4 BN layers, never trained, train."""
    init = save_init(shapes, tmp_path / "init.pt").state_dict()
    with caplog.at_level(logging.INFO, logger="ssd.engine.bn"):
        engine.train(frozen_config(shapes, tmp_path / "init.pt", precise_bn_batches=3), tmp_path / "run")
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.bn=frozen")]
    assert message.startswith(
        "train.bn=frozen: 15 BatchNorm layer(s) frozen with their loaded statistics "
        "(backbone.conv1.0.bn, backbone.conv1.1.bn, "
    )
    assert message.endswith(
        "; 4 without trained statistics train (extras.0.0.bn, extras.0.1.bn, extras.1.0.bn, extras.1.1.bn)"
    )

    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    names = [name for name, _ in bn_tools.bn_layers(build_ssd(config(shapes).model))]
    for name in names[:BACKBONE_BN]:
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(trained[f"{name}.{key}"], init[f"{name}.{key}"]), (name, key)
    for name in names[BACKBONE_BN:]:
        assert int(trained[f"{name}.num_batches_tracked"]) == 3  # precise BN recomputed them
        assert not torch.equal(trained[f"{name}.weight"], torch.ones_like(trained[f"{name}.weight"]))  # affine trained
        assert not torch.equal(trained[f"{name}.running_var"], torch.ones_like(trained[f"{name}.running_var"]))


def test_frozen_without_init_warns_and_trains_every_bn_layer(shapes, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ssd.engine.bn"):
        engine.train(config(shapes, bn="frozen", max_iter=1), tmp_path / "run")
    assert caplog.messages == [
        f"train.bn=frozen: no BatchNorm layer has trained statistics (nothing loaded them from "
        f"model.init or model.init_backbone), so all {NUM_BN} train as with train.bn=train"
    ]
    last = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert {int(v) for k, v in last.items() if k.endswith("num_batches_tracked")} == {1}  # every layer took its step


def test_a_resumed_frozen_run_freezes_the_same_layers(shapes, tmp_path, stop_training_at):
    """An uninterrupted frozen run against the same run stopped in iteration 3 (``last.pt`` of
    iteration 2 on disk) and resumed: the same weights, so the same layers were frozen and trained."""
    init = save_init(shapes, tmp_path / "init.pt").state_dict()
    cfg = frozen_config(shapes, tmp_path / "init.pt", max_iter=4, checkpoint_period=2)
    engine.train(cfg, tmp_path / "whole")

    stop_training_at(3)
    with pytest.raises(RuntimeError, match="stopped in iteration 3"):
        engine.train(cfg, tmp_path / "resumed")
    stop_training_at(None)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["iteration"] == 2
    engine.train(cfg, tmp_path / "resumed", resume=True)

    whole = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert torch.equal(resumed["backbone.fc7.bn.running_var"], init["backbone.fc7.bn.running_var"])  # frozen
    assert int(resumed["extras.1.1.bn.num_batches_tracked"]) == 4  # trained: 4 steps, 2 of them after the resume


def test_small_per_process_batches_under_ddp_warn_naming_sync_and_frozen():
    warning = bn_tools.small_batch_warning
    assert warning("train", 1, 2) is None  # one process: the batch is what it is
    assert warning("train", 2, 8) is None and warning("sync", 8, 2) is None and warning("frozen", 8, 1) is None
    assert warning("train", 8, 4) == (
        "train.bn=train with 4 image(s) per process (8 processes): each BatchNorm layer normalises with "
        "the statistics of 4 images. Use train.bn=sync (statistics over the global batch of 32, CUDA) or "
        "train.bn=frozen (fine-tuning from trained statistics), or 8+ images per process; see docs/batchnorm.md"
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_the_engine_warns_once_on_rank_0_about_a_small_per_process_batch(shapes, tmp_path, monkeypatch, caplog, rank):
    """Batch 8 over 2 processes with ``train.bn=train``. (The warning comes before any collective:
    a 2-rank context without a process group is enough, and a missing data.train stops the run.)"""
    monkeypatch.setattr(engine, "init_distributed", lambda device_type: DistContext(rank=rank, world_size=2))
    cfg = config(shapes)
    cfg.data.train.split = "missing"
    with caplog.at_level(logging.WARNING, logger="ssd.train"), pytest.raises(Exception, match="missing"):
        engine.train(cfg, tmp_path / "run")
    warnings = [m for m in caplog.messages if "per process" in m]
    assert warnings == ([bn_tools.small_batch_warning("train", 2, 4)] if rank == 0 else [])


def test_single_process_sync_mode_trains_with_plain_batchnorm(shapes, tmp_path, monkeypatch):
    models = []
    build = engine.build_ssd
    monkeypatch.setattr(engine, "build_ssd", lambda cfg: models.append(build(cfg)) or models[-1])
    summary = engine.train(config(shapes, bn="sync", max_iter=1), tmp_path / "run")
    assert summary["stopped"] == "done"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in models[0].modules()) == NUM_BN
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in models[0].modules())


def test_sync_mode_on_cpu_under_ddp_is_a_clear_config_error(shapes, tmp_path, monkeypatch, capsys):
    """PyTorch's SyncBatchNorm has no CPU kernel; say so before anything starts. (The check comes
    before any collective, so a 2-rank context without a process group is enough here.)"""
    monkeypatch.setattr(engine, "init_distributed", lambda device_type: DistContext(rank=0, world_size=2))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(shapes, bn="sync")))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "ssd train: error: train.bn=sync needs CUDA devices (this run is on cpu); use train.bn=train or frozen"
    )


# --- precise BN ------------------------------------------------------------------------------------


def record_bn_inputs(model: nn.Module) -> tuple[dict[str, list], list]:
    """Per BN layer, every batch's per-channel input mean and unbiased variance (float64), recorded
    by forward pre-hooks independently of BatchNorm's own bookkeeping."""
    stats = {name: [] for name, _ in bn_tools.bn_layers(model)}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # [C, B*H*W]
            stats[name].append((x.mean(1), x.var(1, unbiased=True)))

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bn_tools.bn_layers(model)]
    return stats, handles


def training_batches(shapes: Path):
    """(loader of augmented training batches of 8, ``forward(model, batch)``)."""
    cfg = config(shapes)
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, SIZE, train=True)
    dataset = build_dataset(cfg.data.train, transform, train=True)
    loader = build_dataloader(dataset, 8, train=True, num_workers=0, seed=0)

    def forward(m, batch):
        return m(normalize_batch(batch["images"], cfg.model.preprocess).contiguous())  # NCHW, as the model

    return loader, forward


def test_precise_bn_gives_population_statistics_of_the_training_data(shapes):
    loader, forward = training_batches(shapes)
    model = bn_model(shapes)
    model.train()
    momenta = [m.momentum for _, m in bn_tools.bn_layers(model)]
    stats, handles = record_bn_inputs(model)
    used = bn_tools.precise_bn(model, loader, forward, num_batches=3)
    for h in handles:
        h.remove()

    assert used == 3 and model.training  # and the train/eval state is restored
    assert [m.momentum for _, m in bn_tools.bn_layers(model)] == momenta
    for name, m in bn_tools.bn_layers(model):
        assert len(stats[name]) == 3 and int(m.num_batches_tracked) == 3
        means = torch.stack([mean for mean, _ in stats[name]]).mean(0)
        variances = torch.stack([var for _, var in stats[name]]).mean(0)  # the BN paper's unbiased estimate
        torch.testing.assert_close(m.running_mean.double(), means, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(m.running_var.double(), variances, rtol=1e-4, atol=1e-5, msg=name)

    # In eval mode the first BN layer now normalises the training data to its affine target: over
    # the same batches its output has per-channel mean = bias (batches of equal size) and
    # variance ~ weight^2 (the batch means barely vary)
    name, first = bn_tools.bn_layers(model)[0]
    outputs = []
    handle = first.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach().double()))
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 3:
                break
            forward(model, batch)
    handle.remove()
    y = torch.cat(outputs).transpose(0, 1).flatten(1)  # [C, N]
    torch.testing.assert_close(y.mean(1), first.bias.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(y.var(1) / first.weight.double() ** 2, torch.ones_like(y[:, 0]), rtol=0, atol=0.1)


def test_engine_runs_precise_bn_after_training(shapes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        engine.train(config(shapes, precise_bn_batches=3), tmp_path / "run")
    assert "precise BN at iteration 2: population statistics over 3 batches" in caplog.messages
    last = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    counters = {k: int(v) for k, v in last.items() if k.endswith("num_batches_tracked")}
    assert len(counters) == NUM_BN and set(counters.values()) == {3}  # reset, then 3 batches (not 2 steps + 3)


def test_precise_bn_leaves_frozen_layers_and_every_module_mode_alone(shapes):
    loader, forward = training_batches(shapes)
    model = bn_model(shapes)
    layers = bn_tools.bn_layers(model)
    frozen = [name for name, _ in layers[:BACKBONE_BN]]
    bn_tools.set_train_mode(model, "frozen", frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert bn_tools.precise_bn(model, loader, forward, num_batches=2, frozen=frozen) == 2
    assert model.training
    for name, m in layers:
        if name in frozen:
            assert not m.training and all(torch.equal(v, before[f"{name}.{k}"]) for k, v in m.state_dict().items()), (
                name
            )
        else:
            assert (
                m.training
                and int(m.num_batches_tracked) == 2
                and not torch.equal(m.running_mean, before[f"{name}.running_mean"])
            )


# --- the never-updated pitfall -------------------------------------------------------------------------


def test_stale_bn_layers_are_those_at_their_initial_statistics(shapes):
    torch.manual_seed(0)
    model = build_ssd(config(shapes).model)
    names = [name for name, _ in bn_tools.bn_layers(model)]
    assert bn_tools.stale_bn_layers(model) == names and len(names) == NUM_BN
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE))
    assert bn_tools.stale_bn_layers(model) == []
    # statistics loaded from converted weights carry no step count: still not stale
    fresh = build_ssd(config(shapes).model)
    state = {
        k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v) for k, v in model.state_dict().items()
    }
    fresh.load_state_dict(state)
    assert bn_tools.stale_bn_layers(fresh) == []


def test_evaluation_warns_about_never_updated_statistics(shapes, tmp_path, caplog):
    """``frozen`` from a checkpoint whose BN never saw data: the loaded initial statistics stay; the
    evaluation says so."""
    torch.manual_seed(0)
    untrained = build_ssd(config(shapes).model).state_dict()
    save_checkpoint(make_checkpoint(untrained, config(shapes).model, SHAPES_CLASSES, "train"), tmp_path / "init.pt")
    cfg = config(shapes, bn="frozen", max_iter=1)
    cfg.model.init = str(tmp_path / "init.pt")
    with caplog.at_level(logging.WARNING, logger="ssd.engine.bn"):
        engine.train(cfg, tmp_path / "run")
    (message,) = [r.getMessage() for r in caplog.records if "initial running statistics" in r.getMessage()]
    assert message.startswith(
        f"evaluation at iteration 1: {NUM_BN} BatchNorm layer(s) still have their initial "
        "running statistics (e.g. backbone.conv1.0.bn)"
    )
    assert "train.precise_bn_batches" in message
