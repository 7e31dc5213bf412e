"""One training step with no host-device synchronisation, and the steps' record read at log steps.

A GPU runs ahead of the Python that queues its work only as long as the host never waits for a
device value. So a step here queues everything and reads nothing back:

- the batch goes to the device with ``non_blocking`` copies (pinned memory) before the forward;
  matching and the loss have fixed shapes (:mod:`ssd.loss`);
- a non-finite loss skips the update *on the device*: the fused optimizers (``torch.optim`` SGD /
  AdamW with ``fused=True``, CPU and CUDA) take a ``found_inf`` flag and leave the weights and their
  state untouched when it is set; under fp16 the GradScaler, which hands the fused optimizer its own
  flag, sees the non-finite loss as NaN gradients (the backward is seeded with NaN);
- each step's loss terms and skip flag stay on the device in :attr:`TrainStep.pending`; :meth:`TrainStep.check`
  reads them all at once (one synchronisation per log period), logs the skipped steps with their
  iteration and image ids, and stops training after ``train.max_bad_steps`` consecutive ones.

A skipped step still counts as an iteration (the host learns about it later); its batch is used up.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssd.config import PreprocessConfig, TrainConfig
from ssd.data.transforms import normalize_batch

log = logging.getLogger("ssd.train")


@dataclass
class BatchForward:
    """``forward(model, batch)``: a loader batch's uint8 NHWC images to the device, normalised, through
    ``model`` under the run's autocast (``dtype`` None: fp32). Used by the step, precise BN and tests."""

    device: torch.device
    preprocess: PreprocessConfig
    channels_last: bool
    dtype: torch.dtype | None

    def __call__(self, model: nn.Module, batch: dict) -> dict:
        pin = self.device.type == "cuda"
        images = normalize_batch(batch["images"].to(self.device, non_blocking=pin), self.preprocess)
        # the loader's batches are NHWC in memory: channels_last costs no copy, NCHW one
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=layout)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return model(images)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and where."""


def fused_optimizer_ok(params: list[nn.Parameter]) -> bool:
    """Whether ``torch.optim``'s fused SGD / AdamW kernels (and their on-device skip) take these parameters."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give fused SGD zero momentum buffers before its first step.

    Fused SGD creates them uninitialised (``empty_like``) in its first step and relies on that step to
    fill them; a first step skipped through ``found_inf`` would leave them holding garbage. A zero buffer
    gives the same first update (``0.9 * 0 + g = g``)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] and group.get("fused"):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


@dataclass
class Window:
    """Host-side sums over the steps :meth:`TrainStep.check` has read since the last log row."""

    loss: float = 0.0
    loc: float = 0.0
    conf: float = 0.0
    good: int = 0
    skipped: int = 0
    amp_skipped: int = 0

    def row(self) -> dict:
        """The log row's loss terms: means over the steps that updated the weights (None if none did)."""
        mean = (lambda v: v / self.good) if self.good else (lambda v: None)
        return {"loss": mean(self.loss), "loc": mean(self.loc), "conf": mean(self.conf), "skipped": self.skipped}


class TrainStep:
    """``step(batch, iteration)`` runs forward, loss, backward and the optimizer update without reading a
    device value; :meth:`check` reads the record of the steps since the last call. A step whose loss is
    non-finite is skipped on the device: the weights, the optimizer state, the BN running statistics and
    the weights' average (``ema``) stay bit-identical; only the EMA's update counter advances."""

    def __init__(
        self,
        net: nn.Module,
        model: nn.Module,
        criterion,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        forward_images,
        tcfg: TrainConfig,
        distributed: bool,
        ema=None,
    ) -> None:
        self.net, self.model, self.criterion, self.optimizer, self.scaler = net, model, criterion, optimizer, scaler
        self.ema = ema  # ssd.engine.ema.ModelEma (train.ema): updated after every optimizer step, on the device
        self.forward_images, self.tcfg, self.distributed = forward_images, tcfg, distributed
        self.device = next(model.parameters()).device
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        self.pending: list[tuple[int, Tensor, list]] = []  # (iteration, [loc, conf, skipped, amp skipped], image ids)
        # the forward in train mode moves BN's running statistics before the loss is known: a skipped step
        # puts them back (on the device, no host read), so a non-finite batch never reaches them
        self.bn_buffers = [
            b
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self.bn_saved = [torch.empty_like(b) for b in self.bn_buffers]
        self.window = Window()
        self.bad_run = 0  # consecutive skipped steps, across windows

    def __call__(self, batch: dict, iteration: int) -> None:
        device, pin = self.device, self.device.type == "cuda"
        gt_boxes = batch["boxes"].to(device, non_blocking=pin)  # queued before the forward, overlapping it
        gt_labels = batch["labels"].to(device, non_blocking=pin)
        if self.bn_buffers:
            torch._foreach_copy_(self.bn_saved, self.bn_buffers)
        outputs = self.forward_images(self.net, batch)
        losses = self.criterion(outputs, gt_boxes, gt_labels, self.model.priors)
        loss = losses["loc"] + losses["conf"]
        bad = (~torch.isfinite(loss)).float()
        # every rank skips together (fp16: DDP's NaN gradients agree)
        if self.distributed and not self.scaler.is_enabled():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            # a NaN seed makes every gradient NaN, so the scaler skips this step as it skips an overflow
            self.scaler.scale(loss * torch.where(bad > 0, torch.nan, 1.0)).backward()
        else:
            loss.backward()
        for buffer, saved in zip(self.bn_buffers, self.bn_saved, strict=True):  # after the backward, which reads them
            buffer.copy_(torch.where(bad > 0, saved, buffer))
        if self.tcfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.clip_grad_norm)
        amp_skipped = self._update(bad)
        if self.ema is not None:  # a skipped step leaves the average as it was too
            self.ema.update(self.model, skip=bad)
        record = torch.stack([losses["loc"].detach(), losses["conf"].detach(), bad, amp_skipped])
        self.pending.append((iteration, record, batch["image_ids"]))

    def _update(self, bad: Tensor) -> Tensor:
        """The optimizer step, skipped on the device when ``bad``; returns the GradScaler's own skip flag."""
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # fused: the scaler hands the optimizer its found_inf, no sync
            found = sum(self.scaler._found_inf_per_device(self.optimizer).values())
            self.scaler.update()
            return found.to(bad.device).reshape(())
        if self.fused:
            # read by the fused kernels: a set flag leaves weights and state as they are
            self.optimizer.found_inf = bad  # type: ignore[attr-defined]  # not declared on Optimizer
            self.optimizer.step()
        elif not bad.item():  # a device without fused kernels: decide on the host (one synchronisation)
            self.optimizer.step()
        return torch.zeros((), device=bad.device)

    def check(self) -> None:
        """Read the pending steps (one synchronisation; under DDP the logged terms are averaged over the
        ranks), log the skipped ones, add the rest to :attr:`window`; raise :class:`TrainingError` after
        ``max_bad_steps`` consecutive skipped steps."""
        if not self.pending:
            return
        values = torch.stack([record for _, record, _ in self.pending])
        if self.distributed:
            dist.all_reduce(values)
            values /= dist.get_world_size()  # the skip flags agree on every rank: 1 stays 1
        w = self.window
        for (iteration, _, image_ids), (loc, conf, bad, amp_skipped) in zip(self.pending, values.tolist(), strict=True):
            w.amp_skipped += int(amp_skipped > 0)
            if bad > 0:
                w.skipped += 1
                self.bad_run += 1
                log.warning(
                    "iteration %d: non-finite loss (loc %s, conf %s), step skipped; images %s",
                    iteration,
                    loc,
                    conf,
                    image_ids,
                )
                if self.bad_run >= self.tcfg.max_bad_steps:
                    self.pending = []
                    raise TrainingError(
                        f"the loss was non-finite for {self.bad_run} consecutive iterations (last: {iteration}); "
                        "stopping without writing NaN weights (a skipped step leaves the weights, the optimizer "
                        "state, BN's running statistics and the weights' average as they were; "
                        "last.pt holds the last saved state). Lower train.lr, raise train.warmup_iters, "
                        "or set train.clip_grad_norm."
                    )
                continue
            self.bad_run = 0
            w.loss, w.loc, w.conf, w.good = w.loss + loc + conf, w.loc + loc, w.conf + conf, w.good + 1
        self.pending = []

    def take_window(self) -> Window:
        self.check()
        window, self.window = self.window, Window()
        return window


@contextlib.contextmanager
def sync_debug_mode(mode: str, enabled: bool):
    """``torch.cuda.set_sync_debug_mode(mode)`` inside the block when ``enabled`` (``train.sync_debug``)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
