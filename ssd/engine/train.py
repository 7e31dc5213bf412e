"""The training loop: iteration-based, one or many processes (torchrun), resumable bit for bit.

Reading order: :func:`train` builds everything from the config, then runs :func:`_train_loop`;
the helpers above them are small and independent (optimizer, schedule). Fine-tuning starts live in
:mod:`ssd.engine.finetune`, the resumable state in :mod:`ssd.engine.state`, the checkpoint to resume
from, the training time across resumes and stop signals in :mod:`ssd.engine.lifecycle`, the log line's
ETA, skipped images, TensorBoard and the progress bar in :mod:`ssd.engine.monitor`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ssd.checkpoint import save_checkpoint
from ssd.config import Config, ConfigError, TrainConfig, save_config, to_dict
from ssd.data.dataset import build_dataset
from ssd.data.loader import EpochIndexSampler, build_dataloader, default_num_workers
from ssd.data.transforms import build_transforms, normalize_batch
from ssd.device import use_channels_last
from ssd.engine import bn as bn_tools
from ssd.engine.distributed import (
    DistContext,
    all_true,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    resolve_device,
)
from ssd.engine.ema import build_ema, combine_evaluations
from ssd.engine.evalset import evaluate_predictions
from ssd.engine.evaluate import amp_dtype, build_eval_loader, build_eval_set, evaluate_model
from ssd.engine.finetune import adopt_source_config, freeze_blocks, init_weights_from, warn_frozen_untrained
from ssd.engine.lifecycle import LAST, PREVIOUS, StopSignal, TrainClock, check_resumed_config, resume_checkpoint
from ssd.engine.machine_load import BusyMachine
from ssd.engine.monitor import Eta, SkippedImages, TensorBoard, draw_samples, format_eta, progress_bar
from ssd.engine.state import best_checkpoint, restore_state, rng_state, training_state, trim_metrics
from ssd.engine.step import TrainingError, TrainStep, fused_optimizer_ok, prime_momentum, sync_debug_mode
from ssd.loss import build_loss
from ssd.model import build_ssd
from ssd.postprocess import build_postprocess

log = logging.getLogger("ssd.train")


# --- small builders -------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def retain_freed_memory() -> bool:
    """Keep freed heap memory in the process instead of handing it back to the OS (glibc only).

    Training frees and reallocates the same multi-MiB activation buffers every step; glibc's defaults
    return them to the kernel (munmap, heap trim) and the next step page-faults them back in. On the
    project's 2-core VM that is ~7% of a CPU training step. Buffers up to 32 MiB (glibc's largest
    mmap threshold) now come from the heap, whose free top is kept up to 1 GiB. Returns whether the
    allocator took the settings (False off Linux or without glibc's ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (paper) or AdamW; optionally no weight decay on BN and bias parameters. Fused kernels where
    torch has them (CPU, CUDA): one kernel per step, and the on-device skip of :mod:`ssd.engine.step`."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm_or_bias = p.ndim <= 1 and "l2norm" not in name  # BN weight/bias, conv biases
        (no_decay if cfg.no_decay_bn_bias and is_norm_or_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})

    def make(fused: bool | None) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)

    optimizer = None
    if fused_optimizer_ok(decay + no_decay):
        try:
            optimizer = make(True)
        except RuntimeError as e:  # a torch without this device's fused kernel: the step then decides skips on the host
            log.debug("fused %s unavailable (%s); using the default implementation", cfg.optimizer, e)
    optimizer = optimizer or make(None)
    prime_momentum(optimizer)
    return optimizer


def lr_factor(it: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Multiplier of ``train.lr`` at iteration ``it``: linear warmup from ``warmup_factor``, then
    step decay by ``gamma`` at each of ``steps`` or a cosine to 0 at ``max_iter``. With
    ``schedule_by_time`` the schedule runs at the larger of ``it`` and ``time_fraction`` (of
    ``time_limit``) times ``max_iter``, so a slow machine still anneals before the time limit."""
    at = max(it, time_fraction * cfg.max_iter) if cfg.schedule_by_time else it
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(at >= s for s in cfg.steps)
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * min(at, cfg.max_iter) / cfg.max_iter))
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


# --- the loop --------------------------------------------------------------------------------------


def train(cfg: Config, output_dir: str | os.PathLike, resume: bool = False) -> dict:
    """Train ``cfg`` into ``output_dir`` (config.yaml, last.pt, best.pt, metrics.jsonl).

    Returns a summary ``{"iteration", "best_map", "best_iter", "stopped"}`` (on rank 0; the other
    ranks get the same keys without metrics).
    """
    tcfg = cfg.train
    device_type = (
        "cuda" if (tcfg.device == "auto" and torch.cuda.is_available()) or tcfg.device.startswith("cuda") else "cpu"
    )
    ctx = init_distributed(device_type)
    try:
        return _train(cfg, Path(output_dir), resume, ctx)
    finally:
        cleanup()


def _train(cfg: Config, out: Path, resume: bool, ctx: DistContext) -> dict:
    cfg = adopt_source_config(cfg)  # model.init's preprocessing and priors, before anything is built or saved
    resumed = resume_checkpoint(out) if resume else None  # last.pt, or last.prev.pt when last.pt cannot be read
    if resumed is not None:
        check_resumed_config(to_dict(cfg), resumed[1].get("full_config"), resumed[0], out)
    tcfg = cfg.train
    device = resolve_device(tcfg.device, ctx.local_rank, key="train.device", world_size=ctx.world_size)
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
    seed_everything(tcfg.seed, tcfg.deterministic)
    if tcfg.retain_host_memory and not retain_freed_memory():  # before the loader workers fork: they inherit it
        log.debug("train.retain_host_memory: this platform's allocator has no mallopt; left as it is")

    # data
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
    loader = build_dataloader(train_set, tcfg.batch_size // ctx.world_size, True, **workers)
    val_loader = build_eval_loader(val_set, cfg.model, cfg.eval.batch_size, num_workers, pin, cfg.data.worker_nice)
    # precise BN reads batches of its own: re-iterating the persistent training loader would restart its
    # one iterator under the training loop, which would then replay the epoch (and break exact resume)
    bn_workers = {**workers, "num_workers": min(num_workers, tcfg.precise_bn_batches)}
    bn_loader = build_dataloader(train_set, tcfg.batch_size // ctx.world_size, True, persistent=False, **bn_workers)
    if len(loader) == 0:
        raise ValueError(
            f"data.train has {len(train_set)} images, fewer than one batch of {tcfg.batch_size // ctx.world_size}"
        )

    # model, loss, optimizer
    model = build_ssd(cfg.model)
    loaded = []  # state-dict keys model.init / model.init_backbone loaded: train.bn=frozen freezes those BN layers
    if cfg.model.init_backbone:
        loaded += init_weights_from(model, cfg.model.init_backbone, backbone_only=True)["loaded"]
    if cfg.model.init:
        loaded += init_weights_from(model, cfg.model.init, backbone_only=False, classes=train_set.classes)["loaded"]
    # before restore_state: a resumed run loads the same init files first, so it freezes the same layers
    frozen = bn_tools.frozen_bn_layers(model, tcfg.bn, loaded)
    frozen += [name for name in freeze_blocks(model, tcfg.freeze) if name not in frozen]
    warn_frozen_untrained(tcfg.freeze, loaded)
    if ctx.enabled:  # the ranks built the same weights from one seed; from here their random streams differ (dropout)
        torch.manual_seed(tcfg.seed + ctx.rank)
    assert isinstance(tcfg.channels_last, str)  # TrainConfig.__post_init__ reads a bool as "true" / "false"
    channels_last = use_channels_last(tcfg.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # stubs lack to(device, memory_format=)
    if tcfg.bn == "sync" and ctx.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bn_tools.set_train_mode(model, tcfg.bn, frozen)
    ema = build_ema(tcfg.ema, model)  # the weights' moving average (train.ema), or None
    criterion = build_loss(cfg.loss, cfg.model)
    postprocessor = build_postprocess(cfg.postprocess, cfg.model)
    optimizer = build_optimizer(tcfg, model)
    clock = TrainClock()  # seconds of training, those before a resume included (train.schedule_by_time, time_limit)
    time_limit = tcfg.time_limit  # never None with schedule_by_time (TrainConfig.__post_init__)
    time_fraction = (
        (lambda: clock.elapsed() / time_limit) if tcfg.schedule_by_time and time_limit is not None else (lambda: 0.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, tcfg, time_fraction()))
    dtype = amp_dtype(tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    iteration, best, fell_back = 0, {"map": -1.0, "iter": 0}, False
    if resumed is not None:
        path, ckpt, fell_back = resumed
        resumed = None  # the checkpoint's memory goes with ckpt below
        iteration, best, clock.before = restore_state(
            ckpt, path, model, optimizer, scheduler, scaler, device, ctx.rank, ema
        )
        del ckpt
        log.info("resumed from %s at iteration %d", path, iteration)

    net: nn.Module = model
    if ctx.enabled:  # the priors are a constant of the config: no broadcast of them in every forward
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["priors"])
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile:
        net = cast(nn.Module, torch.compile(net))  # an OptimizedModule; typed as a plain callable

    def forward_images(m: nn.Module, batch: dict) -> dict:
        # the loader's batches are NHWC in memory: channels_last costs no copy, NCHW one
        images = normalize_batch(batch["images"].to(device, non_blocking=pin), cfg.model.preprocess)
        images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return m(images)

    def evaluate(it: int, final: bool) -> dict | None:
        """``model`` as it is and, with ``train.ema``, its average (named by :func:`combine_evaluations`)."""
        bn_tools.broadcast_bn_statistics(model)  # DDP: rank 0's statistics on every rank, as last.pt saves them
        res = evaluate_weights(model, it, final)
        bn_tools.set_train_mode(model, tcfg.bn, frozen)
        if ema is None:
            return res
        ema.broadcast()  # DDP: rank 0's average on every rank (their BN statistics differ)
        ema_res = evaluate_weights(ema.module, it, final)
        return ema_res and res and combine_evaluations(ema_res, res)  # both None off the main rank

    def evaluate_weights(m: nn.Module, it: int, final: bool) -> dict | None:
        """``ssd eval``'s :func:`evaluate_model` of ``m``; precise BN first after training
        (or before each: precise_bn_before_eval)."""
        which = "" if m is model else " (EMA weights)"
        if tcfg.precise_bn_batches > 0 and (final or tcfg.precise_bn_before_eval):
            # the current epoch's first batches: a function of `it`
            cast(EpochIndexSampler, bn_loader.sampler).set_epoch(it // len(loader))
            n = bn_tools.precise_bn(m, bn_loader, forward_images, tcfg.precise_bn_batches, frozen)
            log.info("precise BN at iteration %d%s: population statistics over %d batches", it, which, n)
        bn_tools.warn_stale_bn(m, f"evaluation at iteration {it}{which}")
        preds = evaluate_model(m, cfg.model, val_loader, postprocessor, device, dtype, channels_last)
        if not ctx.is_main:
            return None
        assert preds is not None  # gathered on the main rank
        # eval.metric auto: VOC07 mAP for VOC-format val data, COCO AP for COCO-format val data
        res = evaluate_predictions(
            val_set, preds, cfg.eval.metric, cfg.eval.voc_pixel_convention, cfg.data.val.annotations
        )
        samples = draw_samples(val_set, preds, tcfg.tensorboard_images) if tensorboard.writer else []
        return {"map": res["map"], "metric": res["metric"], "per_class": res["per_class"], "samples": samples}

    step = TrainStep(net, model, criterion, optimizer, scaler, forward_images, tcfg, ctx.enabled, ema)
    # an unreadable last.pt we fell back from is not kept over the last.prev.pt the run resumed from
    state: dict[str, Any] = dict(iteration=iteration, best=best, clock=clock, keep_last=not fell_back)
    if ctx.is_main:  # the run's folder is written from here on: a run rejected above leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        if not resume or not (out / "config.yaml").exists():  # a resume never rewrites the run's config
            save_config(cfg, out / "config.yaml")
        if resume:
            trim_metrics(out / "metrics.jsonl", iteration)
    tensorboard = TensorBoard(tcfg.tensorboard and ctx.is_main, out / "tensorboard")
    metrics_file = open(out / "metrics.jsonl", "a" if resume else "w") if ctx.is_main else None
    try:
        with StopSignal() as stop:
            stopped = _train_loop(
                cfg,
                ctx,
                step,
                loader,
                scheduler,
                evaluate,
                train_set.classes,
                out,
                metrics_file,
                tensorboard,
                state,
                stop,
            )
    finally:
        tensorboard.close()
        if metrics_file:
            metrics_file.close()
    return {
        "iteration": state["iteration"],
        "best_map": state["best"]["map"],
        "best_iter": state["best"]["iter"],
        "stopped": stopped,
        "signal": stop.name or None,
    }


def refuse_non_finite_bn(model: nn.Module, last: Path) -> None:
    """Stop, on every rank, before a checkpoint with NaN or infinite BN running statistics is written."""
    broken = bn_tools.non_finite_bn_layers(model)
    if all_true(not broken):
        return
    raise TrainingError(
        f"BatchNorm running statistics are non-finite in {', '.join(broken) or 'another rank'}: not saved, {last} "
        "holds the last saved state. Skipped steps never change them: a finite loss came with non-finite "
        "activations. Lower train.lr, raise train.warmup_iters, or set train.clip_grad_norm."
    )


def _train_loop(
    cfg,
    ctx,
    step: TrainStep,
    loader,
    scheduler,
    evaluate,
    classes,
    out: Path,
    metrics_file,
    tensorboard: TensorBoard,
    state: dict,
    stop: StopSignal,
) -> str:
    tcfg = cfg.train
    model, optimizer, scaler = step.model, step.optimizer, step.scaler
    it, clock = state["iteration"], state["clock"]
    per_epoch = len(loader)
    skipped, eta = SkippedImages(), Eta(tcfg.max_iter, tcfg.time_limit)
    busy = BusyMachine() if ctx.world_size == 1 and step.device.type == "cpu" else None  # ranks: not "others"
    window: dict[str, Any] = {"images": 0, "iters": 0, "t": time.perf_counter()}
    clock.start()
    progress = progress_bar(tcfg.max_iter, it, ctx)
    sync_debug = tcfg.sync_debug and step.device.type == "cuda"

    def save_last() -> None:
        # last.pt and best.pt hold the weights the evaluation scored (BN statistics included): with
        # train.ema the average as the default ("model", "eval_weights": "ema") and the raw ones beside it
        step.check()  # the pending steps' skips first: max_bad_steps stops before a save
        bn_tools.broadcast_bn_statistics(step.model)  # DDP: every rank continues with what is saved
        refuse_non_finite_bn(step.model, out / LAST)
        rng_states = gather_objects(rng_state(step.device))  # every rank's own random state
        if ctx.is_main:
            assert rng_states is not None  # gathered on the main rank
            ckpt = training_state(
                step.net,
                optimizer,
                scheduler,
                scaler,
                cfg,
                classes,
                it,
                state["best"],
                rng_states,
                clock.elapsed(),
                step.ema,
            )
            save_checkpoint(ckpt, out / LAST, keep_previous=out / PREVIOUS if state["keep_last"] else None)
            state["keep_last"] = True
        state["saved_at"] = it
        barrier()

    def write_metrics(row: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def log_row() -> None:
        """The log step: the one synchronisation of a log period (:meth:`TrainStep.take_window`)."""
        nonlocal window
        dt = time.perf_counter() - window["t"]
        steps, elapsed = step.take_window(), clock.elapsed()
        row = {
            "iter": it,
            **steps.row(),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": window["images"] / max(dt, 1e-9),
            "time": elapsed,
        }
        left = format_eta(eta.update(it, window["iters"], dt, elapsed))
        if busy is not None:
            busy.check(window["iters"], torch.get_num_threads())
        if scaler.is_enabled():  # fp16: the scale, and the steps the GradScaler skipped for overflowing gradients
            row["grad_scale"], row["amp_skipped"] = scaler.get_scale(), steps.amp_skipped
        write_metrics(row)
        tensorboard.train_row(row)
        if row["loss"] is None:  # every step since the last row was skipped: TrainStep.check warned about each
            window = {"images": 0, "iters": 0, "t": time.perf_counter()}
            return
        if progress is not None:
            progress.set_postfix(
                loss=f"{row['loss']:.3f}",
                loc=f"{row['loc']:.3f}",
                conf=f"{row['conf']:.3f}",
                lr=f"{row['lr']:.2e}",
                ips=f"{row['images_per_s']:.1f}",
                eta=left,
            )
        elif ctx.is_main:
            log.info(
                "iter %d/%d loss %.4f (loc %.4f conf %.4f) lr %.2e %.1f img/s eta %s",
                it,
                tcfg.max_iter,
                row["loss"],
                row["loc"],
                row["conf"],
                row["lr"],
                row["images_per_s"],
                left,
            )
        window = {"images": 0, "iters": 0, "t": time.perf_counter()}

    def run_eval(final: bool = False) -> None:
        res = evaluate(it, final)
        if res is None:
            barrier()
            return
        both = res.get("metrics", {})  # train.ema: "map" is the EMA weights'; map_ema, map_raw name each
        write_metrics({"iter": it, "eval": res["metric"], "map": res["map"], "per_class": res["per_class"], **both})
        tensorboard.eval_row(it, res)
        log.info(
            "iter %d: %s mAP %.4f%s",
            it,
            res["metric"],
            res["map"],
            f" (EMA; raw weights {both['map_raw']:.4f})" if both else "",
        )
        if res["map"] > state["best"]["map"]:  # with train.ema: the EMA weights' mAP, the weights best.pt's default
            state["best"] = {"map": res["map"], "iter": it}
            save_checkpoint(best_checkpoint(model, step.ema, cfg, classes, it, res), out / "best.pt")
        barrier()

    def stop_requested() -> str | None:
        """ "signal", "time_limit" or None, agreed by every rank: host-side, no device value."""
        out_of_time = tcfg.time_limit is not None and clock.elapsed() > tcfg.time_limit
        if all_true(stop.received is None and not out_of_time):
            return None
        return "time_limit" if all_true(stop.received is None) else "signal"

    stop_reason = stop_requested()  # a resumed run may have no time left
    while it < tcfg.max_iter and stop_reason is None:
        epoch, offset = divmod(it, per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = offset * loader.batch_size  # resume mid-epoch on the same batches
        for batch in loader:
            skipped.add(batch["errors"])
            # steady state (after the first log row) must not synchronise: train.sync_debug makes a sync raise
            with sync_debug_mode("error" if sync_debug and it >= tcfg.log_period else "default", sync_debug):
                step(batch, it + 1)
            scheduler.step()  # train.schedule_by_time: at the training time spent so far
            it += 1
            state["iteration"] = it
            window["images"] += len(batch["image_ids"]) * ctx.world_size
            window["iters"] += 1
            if it % tcfg.log_period == 0 or it == tcfg.max_iter:
                log_row()
            if progress is not None:
                progress.update(1)

            t_pause = time.perf_counter()
            if it % tcfg.eval_period == 0 and it < tcfg.max_iter:
                run_eval()
            if it % tcfg.checkpoint_period == 0:  # after the evaluation: last.pt's "best" includes it
                save_last()
            window["t"] += time.perf_counter() - t_pause  # images/s and the ETA count training time only
            # checked every step: a signal or the time limit ends the run within one iteration
            stop_reason = stop_requested()
            if stop_reason is not None or it >= tcfg.max_iter:
                break
        skipped.end_epoch(epoch)
    if progress is not None:
        progress.close()
    if stop_reason == "signal":
        # not again right after train.checkpoint_period's save: last.prev.pt stays older
        if state.get("saved_at") != it:
            save_last()
        if ctx.is_main:
            best = state["best"]
            best_text = f" (best mAP {best['map']:.4f} at iteration {best['iter']})" if best["map"] >= 0 else ""
            by = stop.name or "another process's signal"  # torchrun: every rank stops when one is signalled
            log.warning(
                "stopped by %s at iteration %d: saved %s%s; continue with --resume", by, it, out / LAST, best_text
            )
        return "signal"
    if stop_reason == "time_limit":
        log.info("train.time_limit %.0f s reached at iteration %d", tcfg.time_limit, it)
    step.check()
    run_eval(final=True)  # precise BN first (train.precise_bn_batches)
    save_last()  # the evaluated weights, BN statistics included: the last logged mAP is ssd eval's of last.pt
    return "done" if it >= tcfg.max_iter else "time_limit"
