"""Checkpoint files: round trip, atomic writes, strict loading and the errors for bad files."""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ssd.checkpoint import (
    CheckpointError,
    checkpoint_model_config,
    load_checkpoint,
    load_state_strict,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ssd.cli import main
from ssd.config import ModelConfig, from_dict, to_dict
from ssd.model import build_ssd

CLASSES = ["circle", "square", "triangle", "star"]


def small_config() -> ModelConfig:
    """Width 1/8, 128 px, BN everywhere; 128 px needs only three extras (8 -> 4 -> 2 -> 1)."""
    data = {
        "width": 0.125,
        "input_size": 128,
        "num_classes": len(CLASSES) + 1,
        "batch_norm": "all",
        "dropout": 0.0,
        "extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}, {"mid": 128, "out": 256}],
    }
    return from_dict(ModelConfig, data, "model")


def randomise(model: nn.Module, seed: int) -> None:
    """Random biases, BN affine parameters and running statistics: a freshly built model
    (zero biases, unit BN) then gives clearly different outputs, so a lost tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(17)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = build_ssd(small_config())
    randomise(model, 1)
    return model.eval()


@pytest.fixture(scope="module")
def small_input():
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def saved(small_model, tmp_path):
    path = tmp_path / "run" / "last.pt"  # the folder does not exist yet
    save_checkpoint(make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "train"), path)
    return path


# --- round trip ----------------------------------------------------------------------------------


def test_save_load_round_trip(small_model, saved):
    ckpt = load_checkpoint(saved)
    assert (ckpt["format"], ckpt["version"], ckpt["source"]) == ("ssd", 1, "train")
    assert ckpt["classes"] == CLASSES
    assert ckpt["config"] == {"model": to_dict(small_config())}
    assert checkpoint_model_config(ckpt, saved) == small_config()
    state = small_model.state_dict()
    assert ckpt["model"].keys() == state.keys()
    for k, v in state.items():
        assert ckpt["model"][k].dtype == v.dtype, k
        assert torch.equal(ckpt["model"][k], v), k
    assert ckpt["model"]["backbone.conv1.0.bn.num_batches_tracked"].item() == 17


def test_model_from_checkpoint_rebuilds_identical_model(small_model, small_input, saved):
    model, ckpt = model_from_checkpoint(saved)
    assert ckpt["classes"] == CLASSES
    model.eval()
    with torch.no_grad():
        expected = small_model(small_input)
        got = model(small_input)
        fresh = build_ssd(small_config()).eval()(small_input)
    assert got["conf"].shape == (2, 1524, 5) and got["loc"].shape == (2, 1524, 4)
    torch.testing.assert_close(got["loc"], expected["loc"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["conf"], expected["conf"], rtol=0, atol=1e-6)
    assert (fresh["conf"] - expected["conf"]).abs().max() > 1e-2  # the comparison can tell models apart
    assert torch.equal(model.priors, small_model.priors)


def test_priors_are_not_saved(small_model, saved):
    assert "priors" in dict(small_model.named_buffers())
    assert "priors" not in small_model.state_dict()
    assert not any("priors" in k for k in load_checkpoint(saved)["model"])


def test_make_checkpoint_detaches_and_checks_class_count(small_model):
    ckpt = make_checkpoint(small_model.state_dict(keep_vars=True), small_config(), CLASSES, "train")
    assert not any(v.requires_grad for v in ckpt["model"].values())
    with pytest.raises(ValueError, match="3 class names for a model with 4 foreground classes"):
        make_checkpoint(small_model.state_dict(), small_config(), CLASSES[:3], "train")


# --- atomic writes -------------------------------------------------------------------------------


def test_failed_save_keeps_previous_file_and_leaves_no_temp(small_model, saved):
    before = saved.read_bytes()
    bad = make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "train")
    bad["callback"] = lambda: None  # unpicklable: torch.save fails after starting the file
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint(bad, saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]
    load_checkpoint(saved)  # still a valid checkpoint


def test_failed_first_save_leaves_nothing(tmp_path):
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint({"f": lambda: None}, tmp_path / "new.pt")
    assert os.listdir(tmp_path) == []


def test_saved_file_mode_follows_umask(small_model, tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "shared.pt"
        save_checkpoint(make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "train"), path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_overwrites(small_model, saved):
    other = make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "finetune")
    save_checkpoint(other, saved)
    assert load_checkpoint(saved)["source"] == "finetune"
    assert os.listdir(saved.parent) == [saved.name]


@pytest.mark.parametrize("hard_links", [True, False], ids=["link", "no-link"])
def test_save_keeps_the_replaced_file_as_previous(tmp_path, monkeypatch, hard_links):
    """``keep_previous`` (last.pt -> last.prev.pt): the file replaced is kept, a failed save changes
    neither file, and no temporary file is left; also where the filesystem has no hard links."""

    def no_hard_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(dst))

    if not hard_links:
        monkeypatch.setattr(os, "link", no_hard_links)
    path, previous = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    save_checkpoint({"n": 1}, path, keep_previous=previous)
    assert os.listdir(tmp_path) == ["last.pt"]  # nothing to keep yet
    save_checkpoint({"n": 2}, path, keep_previous=previous)
    save_checkpoint({"n": 3}, path, keep_previous=previous)
    assert (torch.load(path)["n"], torch.load(previous)["n"]) == (3, 2)
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint({"f": lambda: None}, path, keep_previous=previous)
    assert (torch.load(path)["n"], torch.load(previous)["n"]) == (3, 2)
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.pt"]


# --- strict loading ------------------------------------------------------------------------------


def test_load_state_strict_names_unexpected_key(small_model):
    model = build_ssd(small_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(small_model.state_dict(), **{"head.conf.9.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"src\.pt: .*unexpected keys: head\.conf\.9\.weight"):
        load_state_strict(model, state, "src.pt")
    # nothing was loaded: a failed strict load leaves the model as it was
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_state_strict_names_missing_key(small_model):
    state = {k: v for k, v in small_model.state_dict().items() if k != "extras.1.0.bn.running_var"}
    with pytest.raises(CheckpointError, match=r"missing keys: extras\.1\.0\.bn\.running_var$"):
        load_state_strict(build_ssd(small_config()), state, "src.pt")


def test_load_state_strict_names_shape_mismatch(small_model):
    state = dict(small_model.state_dict())
    state["head.conf.0.weight"] = torch.zeros(4 * 7, 64, 3, 3)
    with pytest.raises(CheckpointError, match=re.escape("head.conf.0.weight (28, 64, 3, 3) vs (20, 64, 3, 3)")):
        load_state_strict(build_ssd(small_config()), state, "src.pt")


def test_load_state_strict_wrong_number_of_levels(small_model):
    """Weights of the same model with one extra block fewer do not fit: the missing block is named."""
    cfg = from_dict(ModelConfig, {**to_dict(small_config()), "extras": to_dict(small_config())["extras"][:2]}, "model")
    with pytest.raises(CheckpointError, match=r"missing keys: extras\.2\.0\.conv\.weight"):
        load_state_strict(small_model, build_ssd(cfg).state_dict(), "src.pt")


# --- unreadable or foreign files -----------------------------------------------------------------


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(saved)
    assert str(err.value) == (
        f"{saved}: cannot read as a PyTorch weights file: truncated or corrupt "
        "(PytorchStreamReader failed reading zip archive: failed finding central directory)"
    )


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("model: ssd300\nepochs: 10\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: cannot read as a PyTorch weights file: not a file written by torch.save"
    pickled = tmp_path / "plain.pkl"  # a pickle, but not torch.save's layout: the same error, no warning
    pickled.write_bytes(pickle.dumps({"model": [1, 2]}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            CheckpointError,
            match=re.escape(f"{pickled}: cannot read as a PyTorch weights file: not a file written by torch.save"),
        ):
            load_checkpoint(pickled)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: cannot read as a PyTorch weights file: the file is empty"


class _MakesDirOnLoad:
    """An arbitrary pickled object; unpickling it without ``weights_only`` would run ``os.mkdir``."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickled_object_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "was_unpickled"
    path = tmp_path / "evil.pt"
    torch.save({"format": "ssd", "model": _MakesDirOnLoad(str(marker))}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    assert str(err.value) == (
        f"{path}: cannot read as a PyTorch weights file: it holds a Python object (posix.mkdir); checkpoints "
        "are read as tensors and plain containers only (torch.load with weights_only=True): save a state_dict instead"
    )


@pytest.mark.parametrize(
    "command",
    [
        "predict --weights README.md README.md",
        "eval configs/shapes_tiny.yaml --weights README.md",
        "train configs/shapes_tiny.yaml --init README.md --output-dir {tmp}/run",
    ],
)
def test_cli_names_a_file_that_is_not_a_checkpoint_in_one_line(command, tmp_path, monkeypatch, capsys, caplog):
    """The command's whole output is one line on stderr naming the file: no traceback, no log line and none
    of torch's advice (a warning) to load with ``weights_only=False``; nothing is written."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = command.format(tmp=tmp_path).split()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert main(args) == 2
    out, err = capsys.readouterr()
    assert (
        err
        == f"ssd {args[0]}: error: README.md: cannot read as a PyTorch weights file: not a file written by torch.save\n"
    )
    assert out == "" and caught == [] and caplog.records == []
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: no such")):
        load_checkpoint(path)


def test_raw_state_dict_gets_convert_hint(small_model, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(small_model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"not an ssd checkpoint.*ssd convert"):
        load_checkpoint(path)


def test_newer_version_refused(small_model, tmp_path):
    path = tmp_path / "future.pt"
    ckpt = make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "train")
    save_checkpoint(ckpt | {"version": 2}, path)
    with pytest.raises(CheckpointError, match="version 2 is newer"):
        load_checkpoint(path)


def test_checkpoint_lacking_classes(small_model, tmp_path):
    path = tmp_path / "partial.pt"
    ckpt = make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "train")
    del ckpt["classes"]
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match=r"lacks \['classes'\]"):
        load_checkpoint(path)


def test_bad_config_inside_checkpoint(small_model, tmp_path):
    path = tmp_path / "badcfg.pt"
    ckpt = make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "train")
    ckpt["config"]["model"]["priors"]["clip"] = "cornerz"
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match=r"bad model config.*model\.priors\.clip.*'corners'"):
        model_from_checkpoint(path)


def test_backbone_checkpoint_is_not_a_detector(small_model, tmp_path):
    path = tmp_path / "trunk.pt"
    ckpt = make_checkpoint(small_model.state_dict(), small_config(), CLASSES, "vgg16") | {"kind": "backbone"}
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match="only a backbone"):
        model_from_checkpoint(path)
