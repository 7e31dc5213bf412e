"""Shared fixtures: a tiny SSD config and torchvision's ssd300_vgg16 (random init, nothing downloaded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd.config import ModelConfig, from_dict
from ssd.data.shapes import SHAPES_CLASSES


def pytest_configure(config) -> None:
    # under pytest-xdist (scripts/test.sh: two workers on two cores) each worker computes on one thread:
    # two workers with two threads each would make every parallel region wait for a busy core
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        # the other worker is the harness, not a user's load: a training's "other processes keep the CPUs
        # busy" warning would be noise in every log a test reads (tests/test_machine_load.py tests it alone)
        from ssd.engine.machine_load import BusyMachine

        BusyMachine.check = lambda self, iterations, threads: None


# 128 px input with three stride-2 extras: sources 16, 8, 4, 2, 1 (5 levels, 1524 priors)
TINY_EXTRAS = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}, {"mid": 128, "out": 256}]


def tiny_config(**overrides) -> ModelConfig:
    """A width-1/8, 128 px SSD that builds in ~30 ms and runs a batch of 2 in ~60 ms on CPU."""
    data = {"width": 0.125, "input_size": 128, "extras": TINY_EXTRAS, **overrides}
    return from_dict(ModelConfig, data, "model")


# the tiny training run the engine's tests share: a width-1/8 SSD at 64 px with BatchNorm in every block (conv4_3
# 8x8, fc7 4x4, two stride-2 extras 2x2 and 1x1) on a generated shapes tree, batch 8, on the CPU; a plain
# function (imported like launch_ranks) because each module's own ``config(root, ...)`` helper calls it
TINY_RUN_EXTRAS = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}]


def tiny_run_dict(root: Path, model: dict | None = None, **train_options) -> dict:
    """The run's config as a dict (``from_dict(Config, ...)`` or YAML); ``model`` and ``train_options``
    replace the defaults key by key. Evaluation and checkpoints are off unless a period is given."""
    dataset = {"format": "voc", "root": str(root), "classes": SHAPES_CLASSES}
    return {
        "model": {
            "num_classes": len(SHAPES_CLASSES) + 1,
            "input_size": 64,
            "width": 0.125,
            "batch_norm": "all",
            "dropout": 0.0,
            "extras": TINY_RUN_EXTRAS,
            **(model or {}),
        },
        "data": {"train": {**dataset, "split": "train"}, "val": {**dataset, "split": "val"}, "num_workers": 0},
        "train": {
            "max_iter": 2,
            "batch_size": 8,
            "warmup_iters": 0,
            "device": "cpu",
            "checkpoint_period": 100,
            "eval_period": 100,
            "log_period": 1,
            **train_options,
        },
        "eval": {"batch_size": 10},
    }


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own annotation cache folder (never ~/.cache); a module may define its own."""
    path = tmp_path / "ssd-cache"
    monkeypatch.setenv("SSD_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def make_tiny_config():
    """The :func:`tiny_config` factory (a fixture, so test modules need not import conftest)."""
    return tiny_config


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """``shapes_data(num_train, num_val, size, seed, **options)``: a generated shapes tree (VOC and COCO),
    made once per session for each set of arguments and shared by every module asking for it: read only
    (copy it to change it)."""
    from ssd.data.shapes import generate_shapes

    made: dict[tuple, Path] = {}

    def make(num_train: int, num_val: int, size: int, seed: int, **options) -> Path:
        key = (num_train, num_val, size, seed, tuple(sorted(options.items())))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("shapes")
            generate_shapes(made[key], num_train, num_val, size=size, seed=seed, **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tv_ssd300():
    """torchvision ssd300_vgg16 with 21 classes, random weights, in eval mode."""
    from torchvision.models.detection import ssd300_vgg16

    torch.manual_seed(0)
    return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).eval()


@pytest.fixture(scope="session")
def tv_priors() -> torch.Tensor:
    """Our priors (cxcywh, normalised) for torchvision's ssd300 layout, Tensor[8732, 4]."""
    from ssd.convert.torchvision import torchvision_model_config
    from ssd.model.priors import make_priors, resolve_prior_layout

    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    layout = resolve_prior_layout(torchvision_model_config(21), len(sizes))
    return make_priors(sizes, (300, 300), **layout)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: the same arithmetic in every run, and no OpenMP barriers
    stalling tiny ops whenever a neighbour (a DataLoader worker, another job) holds one of the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch_ranks(world: int, command: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run ``world`` copies of ``python COMMAND`` with torchrun's environment (RANK, WORLD_SIZE, a free
    MASTER_PORT; one thread each, the SSD cache under ``cwd``) and wait for all of them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "SSD_CACHE_DIR": str(Path(cwd) / "cache"),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


@pytest.fixture
def stop_training_at(monkeypatch):
    """``stop_training_at(n)``: the engine's loss raises ``RuntimeError("stopped in iteration n")`` at
    its n-th evaluation (a crash mid-run: ``last.pt`` holds the last save); ``stop_training_at(None)``
    gives the real loss back."""
    import ssd.engine.train as engine

    real_build_loss = engine.build_loss

    def stop_at(iteration: int | None) -> None:
        if iteration is None:
            monkeypatch.setattr(engine, "build_loss", real_build_loss)
            return

        def failing_build_loss(loss_cfg, model_cfg):
            criterion, calls = real_build_loss(loss_cfg, model_cfg), []

            def loss(*args):
                calls.append(None)
                if len(calls) == iteration:
                    raise RuntimeError(f"stopped in iteration {iteration}")
                return criterion(*args)

            return loss

        monkeypatch.setattr(engine, "build_loss", failing_build_loss)

    return stop_at
