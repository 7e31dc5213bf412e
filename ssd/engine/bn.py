"""BatchNorm modes for training (train / frozen / sync), precise BN, the never-updated check, and the
``ssd bn-report`` diagnostics (running vs batch statistics, train/eval gap)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Collection, Iterable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_TYPES)]


def freeze_bn(model: nn.Module, names: Collection[str] | None = None) -> int:
    """``frozen`` mode: BN uses its running statistics and its affine parameters stop training.
    ``names``: the layers to freeze (default: every BN layer). Call after every ``model.train()``
    (see :func:`set_train_mode`). Returns the number of layers frozen."""
    layers = [m for name, m in bn_layers(model) if names is None or name in names]
    for m in layers:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return len(layers)


def set_train_mode(model: nn.Module, bn_mode: str, frozen: Collection[str] | None = None) -> None:
    """``model.train()``, then freeze the BN layers named in ``frozen`` (with ``bn_mode == "frozen"``,
    default: all; the training loop passes :func:`frozen_bn_layers` and those of ``train.freeze`` blocks)."""
    model.train()
    if bn_mode == "frozen" or frozen:
        freeze_bn(model, frozen)


def trained_bn_layers(model: nn.Module, loaded_keys: Iterable[str]) -> list[str]:
    """BN layers (forward order) that came with trained statistics: both their ``running_mean`` and
    ``running_var`` are among ``loaded_keys`` (the ``"loaded"`` lists of
    :func:`ssd.engine.finetune.init_weights_from`)."""
    loaded = set(loaded_keys)
    return [name for name, _ in bn_layers(model) if {f"{name}.running_mean", f"{name}.running_var"} <= loaded]


def frozen_bn_layers(model: nn.Module, bn_mode: str, loaded_keys: Iterable[str]) -> list[str]:
    """The BN layers ``train.bn`` freezes: with ``frozen``, those whose statistics were loaded by
    ``model.init`` / ``model.init_backbone`` (:func:`trained_bn_layers`); layers that never saw
    training data (new extras, a model without init) train, since freezing them would fix their
    initial mean 0 / var 1 forever. With ``train`` and ``sync``: none. Logs the split (and warns
    when ``frozen`` finds nothing to freeze). A function of the init files alone, so a resumed run
    (which loads them again before its checkpoint) freezes the same layers."""
    if bn_mode != "frozen":
        return []
    names = [name for name, _ in bn_layers(model)]
    frozen = trained_bn_layers(model, loaded_keys)
    training = [name for name in names if name not in frozen]
    if names and not frozen:
        log.warning("train.bn=frozen: no BatchNorm layer has trained statistics (nothing loaded them from model.init or "
                    "model.init_backbone), so all %d train as with train.bn=train", len(names))  # fmt: skip
    elif training:
        log.info("train.bn=frozen: %d BatchNorm layer(s) frozen with their loaded statistics (%s); %d without trained "
                 "statistics train (%s)", len(frozen), _names(frozen), len(training), _names(training))  # fmt: skip
    elif frozen:
        log.info("train.bn=frozen: all %d BatchNorm layers frozen with their loaded statistics", len(frozen))
    return frozen


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# Per-process batches below this make BN's batch statistics noisy enough to cost accuracy (Wu & He 2018,
# Group Normalization, Table 2: ResNet-50 with BN, ImageNet error 23.6 / 24.8 / 27.3 / 34.7% at
# 32 / 8 / 4 / 2 images per GPU).
MIN_BN_BATCH = 8


def small_batch_warning(bn_mode: str, world_size: int, per_process_batch: int) -> str | None:
    """The warning for BN in ``train`` mode under DDP with fewer than :data:`MIN_BN_BATCH` images per
    process (each process normalises with its own small batch's statistics), else None."""
    if bn_mode != "train" or world_size < 2 or per_process_batch >= MIN_BN_BATCH:
        return None
    return (f"train.bn=train with {per_process_batch} image(s) per process ({world_size} processes): each BatchNorm layer "
            f"normalises with the statistics of {per_process_batch} images. Use train.bn=sync (statistics over the global "
            f"batch of {per_process_batch * world_size}, CUDA) or train.bn=frozen (fine-tuning from trained statistics), "
            f"or {MIN_BN_BATCH}+ images per process; see docs/batchnorm.md")  # fmt: skip


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, object], object],
    num_batches: int,
    frozen: Collection[str] = (),
) -> int:
    """Recompute the BN layers' running statistics as population statistics over ``num_batches``.

    With ``momentum=None`` PyTorch keeps the cumulative average of the batch means and of the
    *unbiased* batch variances: exactly the BN paper's inference statistics (Alg. 2,
    ``Var[x] = m/(m-1) E_B[sigma_B^2]``). Dropout is off meanwhile, so BN sees inference-time
    inputs. Layers named in ``frozen`` keep their statistics and normalise with them, as in
    training. Under DDP the per-rank statistics are averaged. Every module's train/eval state is
    restored. Returns the number of batches used.

    ``batches`` must not be the training loop's persistent loader (see
    :func:`ssd.data.loader.build_dataloader`): the training engine gives precise BN a loader of its own.
    """
    layers = [m for name, m in bn_layers(model) if name not in frozen]
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    for batch in islice(batches, num_batches):  # no batch read beyond the last one used
        forward(model, batch)
        used += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(world)
    for m, training in modes:
        m.training = training
    return used


def stale_bn_layers(model: nn.Module) -> list[str]:
    """BN layers whose running statistics were never updated (still mean 0, var 1): in eval mode they
    normalise with the wrong statistics, the classic "good in training, bad at test" failure.
    ``num_batches_tracked`` is not consulted: converted or loaded weights carry real statistics
    with a counter of 0."""
    stale = []
    for name, m in bn_layers(model):
        if m.running_mean is None:
            continue
        if bool((m.running_mean == 0).all() and (m.running_var == 1).all()):
            stale.append(name)
    return stale


def warn_stale_bn(model: nn.Module, where: str) -> list[str]:
    stale = stale_bn_layers(model)
    if stale:
        log.warning(
            "%s: %d BatchNorm layer(s) still have their initial running statistics (e.g. %s); eval-mode outputs will "
            "be wrong. Train with train.bn=train or recompute them with train.precise_bn_batches > 0.",
            where, len(stale), stale[0],
        )  # fmt: skip
    return stale


# --- diagnostics: ``ssd bn-report`` -----------------------------------------------------------------

# A layer is "drifted" when, averaged over its channels, its running mean is more than DRIFT_MEAN_GAP batch
# standard deviations away from the population mean of the measured batches, or its running variance is off
# by more than DRIFT_VAR_GAP either way (max(r, 1/r) - 1 of the variance ratio r; 0.5 = a factor 1.5).
# Calibrated on the trained CPU demo model (docs/batchnorm.md): its 21 layers measure at most 0.09 / 0.16 with
# 4 batches of 32, the largest on the 1x1 extras whose few values per batch make a noisy estimate; after only
# a few iterations (running statistics still mostly at their init) layers measure 0.3-0.8 / 0.5-8.
DRIFT_MEAN_GAP = 0.3
DRIFT_VAR_GAP = 0.5


@dataclass
class BNLayerReport:
    """One BN layer: channel averages of its running and measured statistics and the gaps between them.

    ``mean_gap`` = mean over channels of ``|running_mean - batch_mean| / sqrt(batch_var + eps)`` (how
    far eval mode shifts the normalised values, in standard deviations); ``var_gap`` = mean over
    channels of ``max(r, 1/r) - 1`` with ``r = (running_var + eps) / (batch_var + eps)``. The batch
    statistics are population statistics over the measured batches (mean of the batch means, mean of
    the unbiased batch variances: what precise BN would store)."""

    name: str
    channels: int
    running_mean: float
    batch_mean: float
    running_var: float
    batch_var: float
    mean_gap: float
    var_gap: float
    stale: bool
    drifted: bool

    @property
    def flagged(self) -> bool:
        return self.stale or self.drifted


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


@torch.no_grad()
def bn_report(
    model: nn.Module,
    batches: Iterable,
    prepare: Callable[[object], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    criterion: Callable,
    num_batches: int,
    mean_threshold: float = DRIFT_MEAN_GAP,
    var_threshold: float = DRIFT_VAR_GAP,
) -> BNReport:
    """Compare every BN layer's running statistics with the statistics of ``num_batches`` batches.

    ``prepare(batch)`` returns ``(images [B, 3, S, S] normalised, boxes [B, G, 4], labels [B, G])``
    on the model's device. Each batch runs twice: in eval mode (running statistics, what inference
    uses) and in train mode (batch statistics, what training used; dropout off, so BN is the only
    difference), with forward pre-hooks recording each BN input's per-channel mean and unbiased
    variance. The model's weights, running statistics and train/eval state are left as
    they were.
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layers (model.batch_norm: none): nothing to report")
    stale = set(stale_bn_layers(model))
    buffers = {name: [b.clone() for b in m.buffers()] for name, m in layers}
    sums = {name: [0.0, 0.0, 0] for name, _ in layers}  # sum of batch means, sum of batch variances, count

    def hook(name: str):
        def record(module, inputs):
            var, mean = torch.var_mean(inputs[0].detach().float(), dim=(0, 2, 3), correction=1)  # [C] each, no copy
            sums[name][0] = sums[name][0] + mean.double()
            sums[name][1] = sums[name][1] + var.double()
            sums[name][2] += 1

        return record

    modes = [(m, m.training) for m in model.modules()]  # frozen BN is a mixed state: restore every module's
    totals = {"loss_train": 0.0, "loss_eval": 0.0, "conf": [0.0, 0.0], "loc": [0.0, 0.0]}
    used, images_seen = 0, 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            images, boxes, labels = prepare(batch)
            if len(images) < 2:
                continue  # batch statistics need more than one image
            priors = model.priors
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
                for b, saved in zip(m.buffers(), buffers[name]):
                    b.copy_(saved)
            for key, out in (("loss_train", out_train), ("loss_eval", out_eval)):
                losses = criterion(out, boxes, labels, priors)
                totals[key] += float(losses["loc"] + losses["conf"])
            for key in ("conf", "loc"):
                totals[key][0] += float((out_train[key].double() - out_eval[key].double()).pow(2).sum())
                totals[key][1] += float(out_train[key].double().pow(2).sum())
            used += 1
            images_seen += len(images)
    finally:
        for m, training in modes:
            m.training = training
    if used == 0:
        raise ValueError("no batch of at least 2 images to measure BatchNorm statistics on")

    reports = []
    for name, m in layers:
        mean_sum, var_sum, count = sums[name]
        batch_mean, batch_var = mean_sum / count, var_sum / count
        run_mean, run_var = m.running_mean.double(), m.running_var.double()
        mean_gap = (run_mean - batch_mean).abs() / (batch_var + m.eps).sqrt()
        ratio = (run_var + m.eps) / (batch_var + m.eps)
        var_gap = torch.maximum(ratio, 1 / ratio) - 1
        reports.append(BNLayerReport(
            name=name, channels=m.num_features, running_mean=float(run_mean.mean()), batch_mean=float(batch_mean.mean()),
            running_var=float(run_var.mean()), batch_var=float(batch_var.mean()), mean_gap=float(mean_gap.mean()),
            var_gap=float(var_gap.mean()), stale=name in stale,
            drifted=bool(mean_gap.mean() > mean_threshold or var_gap.mean() > var_threshold),
        ))  # fmt: skip
    return BNReport(
        layers=reports, batches=used, images=images_seen, loss_train=totals["loss_train"] / used,
        loss_eval=totals["loss_eval"] / used, conf_gap=(totals["conf"][0] / max(totals["conf"][1], 1e-30)) ** 0.5,
        loc_gap=(totals["loc"][0] / max(totals["loc"][1], 1e-30)) ** 0.5, mean_threshold=mean_threshold,
        var_threshold=var_threshold,
    )  # fmt: skip


def format_bn_report(report: BNReport, title: str = "") -> str:
    """A readable table: one row per BN layer, then the model-level train/eval gap and the verdict."""
    width = max(len("layer"), *(len(layer.name) for layer in report.layers))
    lines = [title] if title else []
    lines.append(f"{'layer':<{width}}  {'ch':>5}  {'run mean':>9}  {'batch mean':>10}  {'run var':>9}  {'batch var':>9}  "
                 f"{'mean gap':>8}  {'var gap':>8}  status")  # fmt: skip
    for r in report.layers:
        status = "STALE (never updated)" if r.stale else ("DRIFTED" if r.drifted else "ok")
        lines.append(f"{r.name:<{width}}  {r.channels:>5}  {r.running_mean:>9.4f}  {r.batch_mean:>10.4f}  {r.running_var:>9.4g}  "
                     f"{r.batch_var:>9.4g}  {r.mean_gap:>8.3f}  {r.var_gap:>8.3f}  {status}")  # fmt: skip
    lines.append("(channel averages; mean gap: |running - batch mean| in batch standard deviations; var gap: max(r, 1/r) - 1 "
                 f"of the variance ratio r; drifted: mean gap > {report.mean_threshold:g} or var gap > {report.var_threshold:g})")  # fmt: skip
    rise = report.loss_eval / report.loss_train - 1 if report.loss_train > 0 else float("nan")
    lines.append(f"train vs eval mode on the same {report.images} images ({report.batches} batches): loss {report.loss_train:.4f} "
                 f"(batch statistics) vs {report.loss_eval:.4f} (running statistics, {rise:+.1%}); outputs differ by "
                 f"{report.conf_gap:.1%} (conf logits) and {report.loc_gap:.1%} (loc), relative L2")  # fmt: skip
    flagged = report.flagged
    if flagged:
        stale = sum(r.stale for r in flagged)
        lines.append(f"FLAGGED {len(flagged)} of {len(report.layers)} layers: {stale} stale, {len(flagged) - stale} drifted "
                     f"(e.g. {flagged[0].name}). Recompute the statistics with precise BN (train.precise_bn_batches), "
                     "or train longer with train.bn=train; see docs/batchnorm.md")  # fmt: skip
    else:
        lines.append(f"all {len(report.layers)} BatchNorm layers ok")
    return "\n".join(lines)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None


def run_bn_report_command(args) -> int:
    """``ssd bn-report --weights CKPT --config CFG [key=value ...] [--batches N] [--device D]``.

    Batches come from ``data.train`` through the training transforms (seed ``train.seed``, batch
    ``train.batch_size``) at the checkpoint's input size and preprocessing. Prints the table; exit
    code 0 when every layer is ok, 1 when any is stale or drifted (like ``ssd data check``).
    """
    from ssd.checkpoint import checkpoint_model_config, model_from_checkpoint
    from ssd.config import load_config
    from ssd.data.dataset import build_dataset
    from ssd.data.loader import build_dataloader, default_num_workers
    from ssd.data.transforms import build_transforms, normalize_batch
    from ssd.loss import build_loss

    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    cfg = load_config(args.config, args.overrides)
    model, ckpt = model_from_checkpoint(args.weights)
    mcfg = checkpoint_model_config(ckpt, args.weights)  # the input size and preprocessing the weights expect
    if not bn_layers(model):
        raise ValueError(f"{args.weights}: the model has no BatchNorm layers (model.batch_norm: none); nothing to report")
    device = _device(args.device)
    model.to(device)
    transform = build_transforms(cfg.data.augment, mcfg.preprocess, mcfg.input_size, train=True)
    dataset = build_dataset(cfg.data.train, transform, train=True, on_error=cfg.data.on_error, key="data.train")
    if len(dataset.classes) != mcfg.num_classes - 1:
        raise ValueError(f"{args.weights} has {mcfg.num_classes - 1} classes but data.train of {args.config} has {len(dataset.classes)}")
    loader = build_dataloader(dataset, cfg.train.batch_size, train=True, num_workers=min(default_num_workers(cfg.data.num_workers), args.batches),
                              seed=cfg.train.seed)  # fmt: skip

    def prepare(batch):
        images = normalize_batch(batch["images"].to(device), mcfg.preprocess)
        return images, batch["boxes"].to(device), batch["labels"].to(device)

    report = bn_report(model, loader, prepare, build_loss(cfg.loss, mcfg), args.batches)
    print(format_bn_report(report, f"BatchNorm report for {args.weights}: {len(report.layers)} layers, data.train of {args.config}"))
    return 1 if report.flagged else 0
