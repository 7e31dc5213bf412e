"""``ssd bn-report``: every BN layer's running statistics against the statistics of real batches, and
the train-mode vs eval-mode gap of the whole model (docs/batchnorm.md, "Diagnosing BN")."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssd.engine.bn import bn_layers, stale_bn_layers

# A layer is "drifted" when, averaged over its channels, its running mean is more than DRIFT_MEAN_GAP batch
# standard deviations away from the population mean of the measured batches, or its running variance is off
# by more than DRIFT_VAR_GAP either way (max(r, 1/r) - 1 of the variance ratio r; 0.5 = a factor 1.5).
# Calibrated on the trained CPU demo model (docs/batchnorm.md): its 21 layers measure at most 0.09 / 0.16 with
# 4 batches of 32, the largest on the 1x1 extras whose few values per batch make a noisy estimate; after only
# a few iterations (running statistics still mostly at their init) layers measure 0.3-0.8 / 0.5-8.
DRIFT_MEAN_GAP = 0.3
DRIFT_VAR_GAP = 0.5
# Sampling noise alone gives gaps too: the measured statistics average only a few batches and the running
# ones a few dozen, and where the batch statistics jump from batch to batch (maps of 1x1 or 3x3, the last
# extras and the heads' last levels, where a batch of B images gives B or 9B values per channel; the first
# layers, whose input statistics vary from image to image) that noise alone crosses the fixed thresholds.
# A layer's thresholds rise to NOISE_FACTOR times the gap that noise gives (:func:`sampling_gaps`, measured
# from the spread between the batches) where this exceeds the fixed ones.
NOISE_FACTOR = 3.0
# `ssd bn-report --batches`: with 8 batches the spread between them is measured well enough that healthy
# models are flagged in <= 1% of sampling seeds (4 batches: up to 1.7%, conv1's noise underestimated);
# scripts/bn_report_rates.py measures it, docs/bn_study.md gives the rates
DEFAULT_BATCHES = 8


def sampling_gaps(
    batch_means: torch.Tensor, batch_vars: torch.Tensor, momentum: float | None, tracked: int = 0, eps: float = 1e-5
) -> tuple[float, float]:
    """The channel-averaged ``(mean_gap, var_gap)`` that sampling noise alone gives a layer whose running
    statistics are right in expectation, from the per-batch statistics ``batch_means`` / ``batch_vars``
    ``[K, C]`` of ``K >= 2`` measured batches (``(0.0, 0.0)`` for one batch: no spread to measure).

    The measured population statistics average ``K`` batches, the running ones are an exponential
    average that weighs ``m / (2 - m)`` of one batch at stationarity (with ``momentum=None``, the
    cumulative average of ``tracked`` batches: ``1 / tracked``): their difference varies by
    ``spread = 1 / K + m / (2 - m)`` times one batch's statistics, whose variance across batches (of
    the mean; of the log of the variance) is measured per channel. The gaps are then ``E|X|`` and
    ``E[exp|X|] - 1`` of zero-mean normals with those variances. Measured rather than derived from the
    values per channel, since values within one image are correlated: on the first layers, whose input
    is the image, 16,384 values per channel vary from batch to batch like a handful."""
    k = batch_means.shape[0]
    if k < 2:
        return 0.0, 0.0
    running = momentum / (2.0 - momentum) if momentum is not None else 1.0 / max(tracked, 1)
    spread = 1.0 / k + running
    var = batch_vars.mean(0) + eps
    sd_mean = (spread * batch_means.var(0) / var).sqrt()  # [C], in batch standard deviations
    sd_log_var = (spread * (batch_vars + eps).log().var(0)).sqrt()  # [C]
    normal_cdf = 0.5 * (1.0 + torch.erf(sd_log_var / math.sqrt(2.0)))
    mean_gap = sd_mean * math.sqrt(2.0 / math.pi)
    var_gap = 2.0 * (sd_log_var**2 / 2.0).exp() * normal_cdf - 1.0
    return float(mean_gap.mean()), float(var_gap.mean())


@dataclass
class BNLayerReport:
    """One BN layer: channel averages of its running and measured statistics and the gaps between them.

    ``mean_gap`` = mean over channels of ``|running_mean - batch_mean| / sqrt(batch_var + eps)`` (how
    far eval mode shifts the normalised values, in standard deviations); ``var_gap`` = mean over
    channels of ``max(r, 1/r) - 1`` with ``r = (running_var + eps) / (batch_var + eps)``. The batch
    statistics are population statistics over the measured batches (mean of the batch means, mean of
    the unbiased batch variances: what precise BN would store). ``values``: values per channel in
    one measured batch (B x H x W); ``mean_threshold`` / ``var_threshold``: the thresholds this layer
    was judged by (the report's, raised where sampling noise is larger: :func:`sampling_gaps`)."""

    name: str
    channels: int
    values: int
    running_mean: float
    batch_mean: float
    running_var: float
    batch_var: float
    mean_gap: float
    var_gap: float
    stale: bool
    drifted: bool
    mean_threshold: float = DRIFT_MEAN_GAP
    var_threshold: float = DRIFT_VAR_GAP
    non_finite: bool = False  # a NaN or an infinity in the running mean or variance

    @property
    def flagged(self) -> bool:
        return self.stale or self.drifted or self.non_finite

    @property
    def noisy(self) -> bool:
        """Judged by thresholds raised for its sampling noise."""
        return self.mean_threshold > DRIFT_MEAN_GAP or self.var_threshold > DRIFT_VAR_GAP


@dataclass
class BNReport:
    """``layers`` in forward order; the model-level train-mode vs eval-mode gap on the same images:
    ``loss_train`` / ``loss_eval`` (MultiBox loss, loc + conf) and the relative L2 differences of
    the raw outputs ``conf_gap`` / ``loc_gap`` (``||train - eval|| / ||train||``)."""

    layers: list[BNLayerReport]
    batches: int
    images: int
    loss_train: float
    loss_eval: float
    conf_gap: float
    loc_gap: float
    mean_threshold: float = DRIFT_MEAN_GAP
    var_threshold: float = DRIFT_VAR_GAP

    @property
    def flagged(self) -> list[BNLayerReport]:
        return [layer for layer in self.layers if layer.flagged]


@dataclass
class BatchStatistics:
    """What :func:`measure_batches` recorded. Per BN layer: ``means`` / ``variances`` ``[K, C]`` (float64,
    unbiased) of its input in each of the ``K`` batches and ``values`` per channel in one batch; for the
    model, the train-mode vs eval-mode losses and output gaps of :class:`BNReport`."""

    means: dict[str, torch.Tensor]
    variances: dict[str, torch.Tensor]
    values: dict[str, int]
    batches: int
    images: int
    loss_train: float
    loss_eval: float
    conf_gap: float
    loc_gap: float


@torch.no_grad()
def measure_batches(
    model: nn.Module,
    batches: Iterable,
    prepare: Callable[[object], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    criterion: Callable,
    num_batches: int,
) -> BatchStatistics:
    """Run ``num_batches`` batches through ``model`` in eval mode and in train mode (dropout off), recording
    each BN input's per-channel statistics in train mode; weights, running statistics and every module's
    train/eval state are left as they were. ``prepare``: as :func:`bn_report`."""
    layers = bn_layers(model)
    buffers = {name: [b.clone() for b in m.buffers()] for name, m in layers}
    # per batch: means [C], unbiased variances [C], values per channel
    stats: dict[str, tuple[list[Any], list[Any], list[Any]]] = {name: ([], [], []) for name, _ in layers}

    def hook(name: str):
        def record(module, inputs):
            var, mean = torch.var_mean(inputs[0].detach().float(), dim=(0, 2, 3), correction=1)  # [C] each, no copy
            values = inputs[0].numel() // inputs[0].shape[1]
            for kept, value in zip(stats[name], (mean.double(), var.double(), values), strict=True):
                kept.append(value)

        return record

    modes = [(m, m.training) for m in model.modules()]  # frozen BN is a mixed state: restore every module's
    totals: dict[str, Any] = {"loss_train": 0.0, "loss_eval": 0.0, "conf": [0.0, 0.0], "loc": [0.0, 0.0]}
    used, images_seen = 0, 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            images, boxes, labels = prepare(batch)
            if len(images) < 2:
                continue  # batch statistics need more than one image
            model.eval()
            out_eval = model(images)
            model.train()
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
            handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
            try:
                out_train = model(images)
            finally:
                for h in handles:
                    h.remove()
            for name, m in layers:  # train mode moved the running statistics: put them back
                for b, saved in zip(m.buffers(), buffers[name], strict=True):
                    b.copy_(saved)
            for key, out in (("loss_train", out_train), ("loss_eval", out_eval)):
                losses = criterion(out, boxes, labels, model.priors)
                totals[key] += float(losses["loc"] + losses["conf"])
            for key in ("conf", "loc"):
                totals[key][0] += float((out_train[key].double() - out_eval[key].double()).pow(2).sum())
                totals[key][1] += float(out_train[key].double().pow(2).sum())
            used += 1
            images_seen += len(images)
    finally:
        for module, training in modes:
            module.training = training
    if used == 0:
        raise ValueError("no batch of at least 2 images to measure BatchNorm statistics on")
    return BatchStatistics(
        means={name: torch.stack(s[0]) for name, s in stats.items()},
        variances={name: torch.stack(s[1]) for name, s in stats.items()},
        values={name: round(sum(s[2]) / len(s[2])) for name, s in stats.items()},
        batches=used,
        images=images_seen,
        loss_train=totals["loss_train"] / used,
        loss_eval=totals["loss_eval"] / used,
        conf_gap=(totals["conf"][0] / max(totals["conf"][1], 1e-30)) ** 0.5,
        loc_gap=(totals["loc"][0] / max(totals["loc"][1], 1e-30)) ** 0.5,
    )


def judge_layer(
    name: str,
    m: nn.modules.batchnorm._BatchNorm,
    stats: BatchStatistics,
    stale: bool = False,
    mean_threshold: float = DRIFT_MEAN_GAP,
    var_threshold: float = DRIFT_VAR_GAP,
    noise_factor: float = NOISE_FACTOR,
) -> BNLayerReport:
    """Layer ``name`` (module ``m``, its running statistics as they are now) against the measured ``stats``."""
    means, variances = stats.means[name], stats.variances[name]  # [K, C]
    batch_mean, batch_var = means.mean(0), variances.mean(0)
    assert m.running_mean is not None and m.running_var is not None  # SSD's BN layers track running statistics
    run_mean, run_var = m.running_mean.double(), m.running_var.double()
    mean_gap = ((run_mean - batch_mean).abs() / (batch_var + m.eps).sqrt()).mean()
    ratio = (run_var + m.eps) / (batch_var + m.eps)
    var_gap = (torch.maximum(ratio, 1 / ratio) - 1).mean()
    tracked = 0 if m.num_batches_tracked is None else int(m.num_batches_tracked)
    noise = sampling_gaps(means, variances, m.momentum, tracked, m.eps)
    thresholds = max(mean_threshold, noise_factor * noise[0]), max(var_threshold, noise_factor * noise[1])
    return BNLayerReport(
        name=name,
        channels=m.num_features,
        values=stats.values[name],
        running_mean=float(run_mean.mean()),
        batch_mean=float(batch_mean.mean()),
        running_var=float(run_var.mean()),
        batch_var=float(batch_var.mean()),
        mean_gap=float(mean_gap),
        var_gap=float(var_gap),
        stale=stale,
        drifted=bool(mean_gap > thresholds[0] or var_gap > thresholds[1]),
        mean_threshold=thresholds[0],
        var_threshold=thresholds[1],
        non_finite=not bool(torch.isfinite(run_mean).all() and torch.isfinite(run_var).all()),
    )


def bn_report(
    model: nn.Module,
    batches: Iterable,
    prepare: Callable[[object], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    criterion: Callable,
    num_batches: int,
    mean_threshold: float = DRIFT_MEAN_GAP,
    var_threshold: float = DRIFT_VAR_GAP,
    noise_factor: float = NOISE_FACTOR,
) -> BNReport:
    """Compare every BN layer's running statistics with the statistics of ``num_batches`` batches.

    ``prepare(batch)`` returns ``(images [B, 3, S, S] normalised, boxes [B, G, 4], labels [B, G])``
    on the model's device. Each batch runs twice: in eval mode (running statistics, what inference
    uses) and in train mode (batch statistics, what training used; dropout off, so BN is the only
    difference), with forward pre-hooks recording each BN input's per-channel mean and unbiased
    variance. A layer is drifted when a gap exceeds ``mean_threshold`` / ``var_threshold``, or
    ``noise_factor`` times what sampling noise alone gives it (:func:`sampling_gaps`) where that is
    larger. The model's weights, running statistics and train/eval state are left as they were.
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layers (model.batch_norm: none): nothing to report")
    stale = set(stale_bn_layers(model))
    stats = measure_batches(model, batches, prepare, criterion, num_batches)
    limits = (mean_threshold, var_threshold, noise_factor)
    return BNReport(
        layers=[judge_layer(name, m, stats, name in stale, *limits) for name, m in layers],
        batches=stats.batches,
        images=stats.images,
        loss_train=stats.loss_train,
        loss_eval=stats.loss_eval,
        conf_gap=stats.conf_gap,
        loc_gap=stats.loc_gap,
        mean_threshold=mean_threshold,
        var_threshold=var_threshold,
    )


def format_bn_report(report: BNReport, title: str = "") -> str:
    """A readable table: one row per BN layer, then the model-level train/eval gap and the verdict."""
    width = max(len("layer"), *(len(layer.name) for layer in report.layers))
    lines = [title] if title else []
    lines.append(
        f"{'layer':<{width}}  {'ch':>5}  {'vals/ch':>7}  {'run mean':>9}  {'batch mean':>10}  {'run var':>9}  "
        f"{'batch var':>9}  {'mean gap':>8}  {'var gap':>8}  status"
    )
    for r in report.layers:
        status = (
            "NON-FINITE" if r.non_finite else "STALE (never updated)" if r.stale else "DRIFTED" if r.drifted else "ok"
        )
        lines.append(
            f"{r.name:<{width}}  {r.channels:>5}  {r.values:>7}  {r.running_mean:>9.4f}  {r.batch_mean:>10.4f}  "
            f"{r.running_var:>9.4g}  {r.batch_var:>9.4g}  {r.mean_gap:>8.3f}  {r.var_gap:>8.3f}  {status}"
        )
    lines.append(
        "(channel averages; vals/ch: values per channel in a batch; mean gap: |running - batch mean| in batch standard "
        "deviations; var gap: max(r, 1/r) - 1 of the variance ratio r; drifted: mean gap > "
        f"{report.mean_threshold:g} or var gap > {report.var_threshold:g})"
    )
    noisy = [r for r in report.layers if r.noisy]
    if noisy:
        shown = ", ".join(f"{r.name} {r.mean_threshold:.2f} / {r.var_threshold:.2f}" for r in noisy[:4])
        lines.append(
            f"(thresholds raised to {NOISE_FACTOR:g}x the gaps sampling noise gives, measured from the spread between "
            f"the batches, for {len(noisy)} layer(s): {shown}{', ...' if len(noisy) > 4 else ''}; more --batches "
            "lower them)"
        )
    rise = report.loss_eval / report.loss_train - 1 if report.loss_train > 0 else float("nan")
    lines.append(
        f"train vs eval mode on the same {report.images} images ({report.batches} batches): "
        f"loss {report.loss_train:.4f} (batch statistics) vs {report.loss_eval:.4f} "
        f"(running statistics, {rise:+.1%}); outputs differ by "
        f"{report.conf_gap:.1%} (conf logits) and {report.loc_gap:.1%} (loc), relative L2"
    )
    flagged = report.flagged
    if flagged:
        stale, broken = sum(r.stale for r in flagged), sum(r.non_finite for r in flagged)
        lines.append(
            f"FLAGGED {len(flagged)} of {len(report.layers)} layers: {broken} non-finite, {stale} stale, "
            f"{len(flagged) - stale - broken} drifted "
            f"(e.g. {flagged[0].name}). Recompute the statistics with precise BN (train.precise_bn_batches), "
            "or train longer with train.bn=train; see docs/batchnorm.md"
        )
    else:
        lines.append(f"all {len(report.layers)} BatchNorm layers ok")
    return "\n".join(lines)


def report_setup(
    cfg, model: nn.Module, ckpt: dict, weights: str | Path, config: str | Path, num_batches: int
) -> tuple[Callable, Callable, Callable]:
    """``(batches, prepare, criterion)`` for :func:`bn_report` of ``model`` (loaded from ``weights``; ``cfg``
    read from ``config``): ``batches(seed)`` is a loader of ``data.train`` through the training transforms
    (batch ``train.batch_size``) at the checkpoint's input size and preprocessing, on ``model``'s device."""
    from ssd.checkpoint import checkpoint_model_config
    from ssd.data.dataset import build_dataset
    from ssd.data.loader import build_dataloader, default_num_workers
    from ssd.data.transforms import build_transforms, normalize_batch
    from ssd.loss import build_loss

    mcfg = checkpoint_model_config(ckpt, weights)  # the input size and preprocessing the weights expect
    assert mcfg.input_size is not None  # set by ModelConfig.__post_init__
    transform = build_transforms(cfg.data.augment, mcfg.preprocess, mcfg.input_size, train=True)
    dataset = build_dataset(cfg.data.train, transform, train=True, on_error=cfg.data.on_error, key="data.train")
    if len(dataset.classes) != mcfg.num_classes - 1:
        raise ValueError(
            f"{weights} has {mcfg.num_classes - 1} classes but data.train of {config} has {len(dataset.classes)}"
        )
    device = next(model.parameters()).device
    workers = min(default_num_workers(cfg.data.num_workers), num_batches)

    def batches(seed: int):
        return build_dataloader(dataset, cfg.train.batch_size, train=True, num_workers=workers, seed=seed)

    def prepare(batch):
        images = normalize_batch(batch["images"].to(device), mcfg.preprocess)
        return images, batch["boxes"].to(device), batch["labels"].to(device)

    return batches, prepare, build_loss(cfg.loss, mcfg)
