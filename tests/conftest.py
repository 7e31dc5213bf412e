"""Shared fixtures: a tiny SSD config and torchvision's ssd300_vgg16 (random init, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from ssd.config import ModelConfig, from_dict

# 128 px input with three stride-2 extras: sources 16, 8, 4, 2, 1 (5 levels, 1524 priors)
TINY_EXTRAS = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}, {"mid": 128, "out": 256}]


def tiny_config(**overrides) -> ModelConfig:
    """A width-1/8, 128 px SSD that builds in ~30 ms and runs a batch of 2 in ~60 ms on CPU."""
    data = {"width": 0.125, "input_size": 128, "extras": TINY_EXTRAS, **overrides}
    return from_dict(ModelConfig, data, "model")


@pytest.fixture(scope="session")
def make_tiny_config():
    """The :func:`tiny_config` factory (a fixture, so test modules need not import conftest)."""
    return tiny_config


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
