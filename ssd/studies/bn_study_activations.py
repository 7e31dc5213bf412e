"""What the BN study measures inside the network: the values entering the ReLU that ends each feature
block (and the class logits of the first head), on one fixed batch, at the run's exact start weights
and at its end, as histograms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssd.config import BN_BLOCKS, Config
from ssd.engine.finetune import init_weights_from
from ssd.engine.train import seed_everything
from ssd.model import SSD, build_ssd

HIST_BINS = 60
HIST_SAMPLES = 100_000  # values kept per histogram (a fixed random subset)


def activation_taps(model: SSD) -> dict[str, tuple[nn.Module, str]]:
    """Layer name -> (module, "input" or "output"): the input of the ReLU after the last conv(+BN) of
    each feature block (conv1_2 ... fc7, extras.0), and ``conf.0``, the class logits of the first
    source as the loss sees them (the output of ``head.conf_bn.0`` with head BN, else of ``head.conf.0``;
    no ReLU follows a prediction conv)."""
    backbone = model.backbone
    taps = {
        f"{block}_{len(getattr(backbone, block))}": (getattr(backbone, block)[-1].relu, "input")
        for block in BN_BLOCKS[:5]
    }
    taps["fc7"] = (backbone.fc7.relu, "input")
    if len(model.extras):
        taps["extras.0"] = (model.extras[0][-1].relu, "input")  # type: ignore[index]  # a Sequential, typed Module
    head = model.head
    taps["conf.0"] = (head.conf_bn[0] if head.batch_norm else head.conf[0], "output")
    return taps


@torch.no_grad()
def preactivations(model: SSD, images: Tensor, max_values: int = HIST_SAMPLES, seed: int = 0) -> dict[str, Tensor]:
    """Values at each tap of :func:`activation_taps` (a fixed random subset of at most ``max_values``),
    float32 CPU.

    BN runs in train mode (batch statistics, as in training) and dropout is off; the model's
    running statistics move, so pass a throwaway model. The ReLUs are in-place: the hooks copy. A tap
    called several times in one forward (the VGG stem runs in image chunks where it has no BN) keeps
    every call's values: the subset is drawn from all the images.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    calls: dict[str, list[Tensor]] = {}

    def keep(name: str, x: Tensor) -> None:
        calls.setdefault(name, []).append(x.detach().flatten().float().cpu().clone())

    handles = []
    for name, (module, where) in activation_taps(model).items():
        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda m, inputs, name=name: keep(name, inputs[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, inputs, output, name=name: keep(name, output)))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    values: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for name, parts in calls.items():  # in forward order, so the subsets follow from the seed alone
        x = torch.cat(parts)
        values[name] = x[torch.randint(x.numel(), (max_values,), generator=generator)] if x.numel() > max_values else x
    return values


def start_model(cfg: Config) -> SSD:
    """The weights ``train(cfg)`` starts from: the same seeding, then the same build and init files."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_ssd(cfg.model)
    if cfg.model.init_backbone:
        init_weights_from(model, cfg.model.init_backbone, backbone_only=True)
    if cfg.model.init:
        init_weights_from(model, cfg.model.init, backbone_only=False)
    return model


def histograms(start: dict[str, Tensor], end: dict[str, Tensor] | None) -> dict[str, dict]:
    """Per layer: shared bin edges over the 0.5-99.5 percentile range of start and end together, and
    for each phase the density counts, mean, std and the fraction passing the ReLU (> 0)."""
    out = {}
    for name, x0 in start.items():
        phases = {"start": x0} if end is None or name not in end else {"start": x0, "end": end[name]}
        finite = torch.cat([x[torch.isfinite(x)] for x in phases.values()])
        lo, hi = torch.quantile(finite, torch.tensor([0.005, 0.995])).tolist() if finite.numel() else (-1.0, 1.0)
        if not hi > lo:
            lo, hi = lo - 1.0, hi + 1.0
        edges = torch.linspace(lo, hi, HIST_BINS + 1)
        cell: dict[str, Any] = {"edges": [round(e, 6) for e in edges.tolist()]}
        for phase, values in phases.items():
            x = values[torch.isfinite(values)]
            # outside the range: dropped
            counts = torch.histc(x, HIST_BINS, lo, hi) if x.numel() else torch.zeros(HIST_BINS)
            density = counts / max(1, x.numel()) / float(edges[1] - edges[0])  # the area shown = the share in range
            cell[phase] = {
                "density": [round(d, 6) for d in density.tolist()],
                "mean": float(x.mean()) if x.numel() else None,
                "std": float(x.std()) if x.numel() > 1 else None,
                "positive": float((x > 0).float().mean()) if x.numel() else None,
                "finite": x.numel() / max(1, values.numel()),
            }
        out[name] = cell
    return out
