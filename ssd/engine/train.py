"""The training loop: iteration-based, one or many processes (torchrun), resumable bit for bit.

Reading order: :func:`train` builds a :class:`Run` from the config (:func:`build_run`) and runs
:func:`run_loop`, whose body reads top to bottom: step, log, evaluate, checkpoint, stop. The parts live
beside it: the step in :mod:`ssd.engine.step`, the optimizer and schedule in :mod:`ssd.engine.optim`,
evaluation during training in :mod:`ssd.engine.train_eval`, ``last.pt`` / ``best.pt`` and resuming in
:mod:`ssd.engine.checkpoints`, the training clock and stop signals in :mod:`ssd.engine.lifecycle`, the
log line, ``metrics.jsonl`` and TensorBoard in :mod:`ssd.engine.monitor`, fine-tuning starts in
:mod:`ssd.engine.finetune`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import nn

from ssd.config import Config, ConfigError, save_config, to_dict
from ssd.data.dataset import DetectionDataset, build_dataset
from ssd.data.loader import EpochIndexSampler, build_dataloader, default_num_workers
from ssd.data.transforms import build_transforms
from ssd.device import resolve_device, retain_freed_memory, use_channels_last
from ssd.engine import bn as bn_tools
from ssd.engine.checkpoints import (
    LAST,
    Checkpointer,
    check_resumed_config,
    restore_state,
    resume_checkpoint,
    trim_metrics,
)
from ssd.engine.distributed import DistContext, all_true, barrier, cleanup, init_distributed
from ssd.engine.ema import build_ema
from ssd.engine.evaluate import amp_dtype, build_eval_loader, build_eval_set
from ssd.engine.finetune import adopt_source_config, freeze_blocks, init_weights_from, warn_frozen_untrained
from ssd.engine.lifecycle import StopSignal, TrainClock
from ssd.engine.monitor import SkippedImages, TrainLog
from ssd.engine.optim import build_optimizer, build_scheduler
from ssd.engine.report import report_run
from ssd.engine.step import BatchForward, TrainStep, sync_debug_mode
from ssd.engine.train_eval import TrainEvaluator, TrainSample, build_train_sample
from ssd.loss import build_loss
from ssd.model import build_ssd
from ssd.postprocess import build_postprocess

log = logging.getLogger("ssd.train")


def train(cfg: Config, output_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Train ``cfg`` into ``output_dir`` (config.yaml, last.pt, best.pt, metrics.jsonl).

    Returns a summary ``{"iteration", "best_map", "best_iter", "stopped", "signal"}`` (on rank 0; the
    other ranks get the same keys without metrics).
    """
    cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    ctx = init_distributed("cuda" if cuda else "cpu")
    try:
        run = build_run(cfg, Path(output_dir), resume, ctx)
        try:
            with StopSignal() as stop:
                stopped = run_loop(run, stop)
        finally:
            run.log.close()
        summary = {"iteration": run.iteration, "best_map": run.best["map"], "best_iter": run.best["iter"]}
        return summary | {"stopped": stopped, "signal": stop.name or None}
    finally:
        cleanup()


def run_loop(run: Run, stop: StopSignal) -> str:
    """Train until ``train.max_iter``, the time limit or a signal; returns "done", "time_limit" or "signal"."""
    tcfg = run.cfg.train
    run.clock.start()
    reason = run.stop_reason(stop)  # a resumed run may have no time left
    while run.iteration < tcfg.max_iter and reason is None:
        epoch = run.start_epoch()
        for batch in run.loader:
            run.train_step(batch)
            it = run.iteration
            if it % tcfg.log_period == 0 or it == tcfg.max_iter:
                run.log.train_row(it, run.step, run.clock)
            with run.log.paused():  # images/s and the ETA count training time only
                if it % tcfg.eval_period == 0 and it < tcfg.max_iter:
                    run.evaluate()
                if it % tcfg.checkpoint_period == 0:  # after the evaluation: last.pt's "best" includes it
                    run.save_last()
            reason = run.stop_reason(stop)  # checked every step: a stop comes within one iteration
            if reason is not None or it >= tcfg.max_iter:
                break
        run.skipped.end_epoch(epoch)
    run.log.end_progress()
    if reason == "signal":
        run.stop_for_signal(stop)
        return "signal"
    if reason == "time_limit":
        log.info("train.time_limit %.0f s reached at iteration %d", tcfg.time_limit, run.iteration)
    run.step.check()
    run.evaluate(final=True)  # precise BN first (train.precise_bn_batches)
    run.save_last()  # the evaluated weights, BN statistics included: the last logged mAP is ssd eval's of last.pt
    run.report()
    return "done" if run.iteration >= tcfg.max_iter else "time_limit"


@dataclass
class Run:
    """Everything the loop needs, built by :func:`build_run`, and the run's state (iteration, best mAP)."""

    cfg: Config
    ctx: DistContext
    step: TrainStep
    loader: Any  # the training DataLoader (EpochIndexSampler)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    evaluator: TrainEvaluator
    checkpoints: Checkpointer
    clock: TrainClock
    log: TrainLog
    skipped: SkippedImages = field(default_factory=SkippedImages)
    iteration: int = 0
    best: dict = field(default_factory=lambda: {"map": -1.0, "iter": 0})
    final: dict | None = None  # the evaluation after training (rank 0)

    def start_epoch(self) -> int:
        """Point the sampler at the current iteration's epoch and batch (a resume continues mid-epoch)."""
        epoch, offset = divmod(self.iteration, len(self.loader))
        self.loader.sampler.set_epoch(epoch)
        self.loader.sampler.skip = offset * self.loader.batch_size
        return epoch

    def train_step(self, batch: dict) -> None:
        self.skipped.add(batch["errors"])
        tcfg = self.cfg.train
        sync_debug = tcfg.sync_debug and self.step.device.type == "cuda"
        # steady state (after the first log row) must not synchronise: train.sync_debug makes a sync raise
        with sync_debug_mode("error" if sync_debug and self.iteration >= tcfg.log_period else "default", sync_debug):
            self.step(batch, self.iteration + 1)
        self.scheduler.step()  # train.schedule_by_time: at the training time spent so far
        self.iteration += 1
        self.log.count(len(batch["image_ids"]))

    def evaluate(self, final: bool = False) -> None:
        """Score the weights; a better mAP is saved as best.pt (with train.ema: the average's mAP)."""
        it = self.iteration
        res = self.evaluator(it, final)
        if final:
            self.final = res
        if res is not None:
            self.log.eval_row(it, res)
            if res["map"] > self.best["map"]:
                self.best = {"map": res["map"], "iter": it}
                self.checkpoints.save_best(it, res)
        barrier()

    def save_last(self) -> None:
        self.checkpoints.save_last(self.iteration, self.best)

    def report(self) -> None:
        """report.json, results.png and the report's lines (:mod:`ssd.engine.report`), on rank 0."""
        if self.ctx.is_main:
            priors = cast(torch.Tensor, self.evaluator.model.priors)
            report_run(self.checkpoints.out, self.cfg, priors, self.loader.dataset, self.iteration, self.final)

    def stop_reason(self, stop: StopSignal) -> str | None:
        """ "signal", "time_limit" or None, agreed by every rank: host-side, no device value."""
        limit = self.cfg.train.time_limit
        out_of_time = limit is not None and self.clock.elapsed() > limit
        if all_true(stop.received is None and not out_of_time):
            return None
        return "time_limit" if all_true(stop.received is None) else "signal"

    def stop_for_signal(self, stop: StopSignal) -> None:
        # not again right after a periodic save: last.prev.pt stays older
        if self.checkpoints.saved_at != self.iteration:
            self.save_last()
        if self.ctx.is_main:
            best = self.best
            best_text = f" (best mAP {best['map']:.4f} at iteration {best['iter']})" if best["map"] >= 0 else ""
            by = stop.name or "another process's signal"  # torchrun: every rank stops when one is signalled
            last = self.checkpoints.out / LAST
            log.warning(
                "stopped by %s at iteration %d: saved %s%s; continue with --resume", by, self.iteration, last, best_text
            )


# --- building a run ------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def check_setup(cfg: Config, ctx: DistContext, device: torch.device) -> None:
    """Refuse settings this launch cannot honour; warn where BN would see too small a batch."""
    tcfg = cfg.train
    if tcfg.batch_size % ctx.world_size:
        raise ValueError(f"train.batch_size {tcfg.batch_size} must be divisible by the {ctx.world_size} processes")
    if tcfg.schedule_by_time and ctx.enabled:  # each rank's clock differs: their learning rates would too
        raise ConfigError("train.schedule_by_time works in single-process runs only; unset it under torchrun")
    if tcfg.bn == "sync" and ctx.enabled and device.type != "cuda":  # PyTorch's SyncBatchNorm has no CPU kernel
        raise ConfigError(
            f"train.bn=sync needs CUDA devices (this run is on {device.type}); use train.bn=train or frozen"
        )
    small_batch = bn_tools.small_batch_warning(tcfg.bn, ctx.world_size, tcfg.batch_size // ctx.world_size)
    if small_batch and ctx.is_main:
        log.warning(small_batch)


class TrainData(NamedTuple):
    train_set: DetectionDataset
    val_set: DetectionDataset
    loader: Any
    val_loader: Any
    bn_loader: Any  # precise BN's: re-iterating the persistent training loader would restart its one
    # iterator under the training loop, which would then replay the epoch (and break exact resume)
    train_sample: TrainSample | None  # eval.train_sample


def build_train_data(cfg: Config, ctx: DistContext, device: torch.device) -> TrainData:
    tcfg, per_process = cfg.train, cfg.train.batch_size // ctx.world_size
    assert cfg.model.input_size is not None  # set by ModelConfig.__post_init__
    train_tf = build_transforms(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size, train=True)
    train_set = build_dataset(cfg.data.train, train_tf, train=True, on_error=cfg.data.on_error, key="data.train")
    val_set = build_eval_set(cfg, cfg.model)  # ssd eval's data and preprocessing (ssd.preprocess)
    if len(train_set.classes) != cfg.model.num_classes - 1:
        raise ValueError(
            f"model.num_classes is {cfg.model.num_classes} but data.train has {len(train_set.classes)} classes "
            f"(+1 background = {len(train_set.classes) + 1})"
        )
    pin = device.type == "cuda"
    num_workers = default_num_workers(cfg.data.num_workers)
    if cfg.data.num_workers is None and ctx.is_main:
        log.info("data.num_workers: %d loader workers per process (unset: follows this machine's CPUs)", num_workers)
    workers: dict[str, Any] = dict(
        num_workers=num_workers, seed=tcfg.seed, pin_memory=pin, worker_nice=cfg.data.worker_nice
    )
    loader = build_dataloader(train_set, per_process, True, **workers)
    val_loader = build_eval_loader(val_set, cfg.model, cfg.eval.batch_size, num_workers, pin, cfg.data.worker_nice)
    bn_workers = {**workers, "num_workers": min(num_workers, tcfg.precise_bn_batches)}
    bn_loader = build_dataloader(train_set, per_process, True, persistent=False, **bn_workers)
    if len(loader) == 0:
        raise ValueError("data.train has no images")
    passes = cast(EpochIndexSampler, loader.sampler).passes
    if passes > 1 and ctx.is_main:
        log.info(
            "data.train has %d images, fewer than a batch of %d per process: an epoch is %d passes (%d batches)",
            len(train_set), per_process, passes, len(loader),
        )  # fmt: skip
    sample = build_train_sample(train_set, cfg, num_workers, pin)
    return TrainData(train_set, val_set, loader, val_loader, bn_loader, sample)


def build_train_model(
    cfg: Config, ctx: DistContext, device: torch.device, classes: list[str]
) -> tuple[nn.Module, list[str]]:
    """The model on ``device`` with its init weights, frozen layers and BN modes; and the frozen BN layers."""
    tcfg = cfg.train
    model = build_ssd(cfg.model)
    loaded = []  # state-dict keys model.init / model.init_backbone loaded: train.bn=frozen freezes those BN layers
    if cfg.model.init_backbone:
        loaded += init_weights_from(model, cfg.model.init_backbone, backbone_only=True)["loaded"]
    if cfg.model.init:
        loaded += init_weights_from(model, cfg.model.init, backbone_only=False, classes=classes)["loaded"]
    # before restore_state: a resumed run loads the same init files first, so it freezes the same layers
    frozen = bn_tools.frozen_bn_layers(model, tcfg.bn, loaded)
    frozen += [name for name in freeze_blocks(model, tcfg.freeze) if name not in frozen]
    warn_frozen_untrained(tcfg.freeze, loaded)
    if ctx.enabled:  # the ranks built the same weights from one seed; from here their random streams differ (dropout)
        torch.manual_seed(tcfg.seed + ctx.rank)
    assert isinstance(tcfg.channels_last, str)  # TrainConfig.__post_init__ reads a bool as "true" / "false"
    layout = torch.channels_last if use_channels_last(tcfg.channels_last, device) else torch.contiguous_format
    model.to(device, memory_format=layout)  # type: ignore[call-overload]  # stubs lack to(device, memory_format=)
    if tcfg.bn == "sync" and ctx.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bn_tools.set_train_mode(model, tcfg.bn, frozen)
    return model, frozen


def wrap_model(model: nn.Module, cfg: Config, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP under torchrun, then ``torch.compile`` (train.compile): the module the step runs."""
    net: nn.Module = model
    if ctx.enabled:  # the priors are a constant of the config: no broadcast of them in every forward
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["priors"])
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = cast(nn.Module, torch.compile(net))  # an OptimizedModule; typed as a plain callable
    return net


def prepare_output(cfg: Config, out: Path, resume: bool, ctx: DistContext, iteration: int) -> None:
    """The run's folder, written from here on: a run rejected while building leaves nothing behind."""
    if not ctx.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    if not resume or not (out / "config.yaml").exists():  # a resume never rewrites the run's config
        save_config(cfg, out / "config.yaml")
    if resume:
        trim_metrics(out / "metrics.jsonl", iteration)


def build_run(cfg: Config, out: Path, resume: bool, ctx: DistContext) -> Run:
    """Everything the loop needs, in an order that keeps the random streams of earlier runs."""
    cfg = adopt_source_config(cfg)  # model.init's preprocessing and priors, before anything is built or saved
    resumed = resume_checkpoint(out) if resume else None  # last.pt, or last.prev.pt when last.pt cannot be read
    if resumed is not None:
        check_resumed_config(to_dict(cfg), resumed[1].get("full_config"), resumed[0], out)
    tcfg = cfg.train
    device = resolve_device(tcfg.device, ctx.local_rank, key="train.device", world_size=ctx.world_size)
    check_setup(cfg, ctx, device)
    seed_everything(tcfg.seed, tcfg.deterministic)
    if tcfg.retain_host_memory and not retain_freed_memory():  # before the loader workers fork: they inherit it
        log.debug("train.retain_host_memory: this platform's allocator has no mallopt; left as it is")
    data = build_train_data(cfg, ctx, device)
    model, frozen = build_train_model(cfg, ctx, device, data.train_set.classes)
    ema = build_ema(tcfg.ema, model)  # the weights' moving average (train.ema), or None
    criterion = build_loss(cfg.loss, cfg.model)
    postprocessor = build_postprocess(cfg.postprocess, cfg.model)
    optimizer = build_optimizer(tcfg, model)
    clock = TrainClock()  # seconds of training, those before a resume included (train.schedule_by_time, time_limit)
    scheduler = build_scheduler(tcfg, optimizer, clock.elapsed)
    dtype = amp_dtype(tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    iteration, best, fell_back = 0, {"map": -1.0, "iter": 0}, False
    if resumed is not None:
        path, ckpt, fell_back = resumed
        del resumed  # the checkpoint's memory goes with ckpt below
        iteration, best, clock.before = restore_state(
            ckpt, path, model, optimizer, scheduler, scaler, device, ctx.rank, ema
        )
        del ckpt
        log.info("resumed from %s at iteration %d", path, iteration)
    forward = BatchForward(
        device, cfg.model.preprocess, use_channels_last(cast(str, tcfg.channels_last), device), dtype
    )
    step = TrainStep(
        wrap_model(model, cfg, ctx, device), model, criterion, optimizer, scaler, forward, tcfg, ctx.enabled, ema
    )
    prepare_output(cfg, out, resume, ctx, iteration)
    train_log = TrainLog(tcfg, ctx, out, iteration, append=resume, cpu=device.type == "cpu")
    evaluator = TrainEvaluator(
        cfg, ctx, model, ema, frozen, data.val_set, data.val_loader, data.bn_loader, len(data.loader), forward,
        postprocessor, tcfg.tensorboard_images if train_log.tensorboard.writer else 0, data.train_sample,
    )  # fmt: skip
    classes = data.train_set.classes
    # an unreadable last.pt we fell back from is not kept over the last.prev.pt the run resumed from
    checkpoints = Checkpointer(out, cfg, classes, step, scheduler, clock, ctx.is_main, keep_last=not fell_back)
    return Run(
        cfg, ctx, step, data.loader, scheduler, evaluator, checkpoints, clock, train_log, iteration=iteration, best=best
    )
