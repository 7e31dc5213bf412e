"""An exponential moving average (EMA) of the weights, ``train.ema``: evaluated and saved beside them.

After every optimizer step each floating-point tensor of the model's state dict (parameters and the
BN running statistics) moves towards the model's::

    ema = decay_n * ema + (1 - decay_n) * weights,   decay_n = min(decay, (1 + n) / (10 + n))

where ``n`` counts the updates before this one (0 for the first). The warmup is TensorFlow's
``tf.train.ExponentialMovingAverage(decay, num_updates)`` rule. Without it the first weights (a random
initialisation) would keep a weight ``decay**t`` after ``t`` steps: 0.999**1500 = 0.22 at the end of the
CPU demo's ~1,500 iterations. With it, after ``t`` updates iterate ``k`` weighs about ``9 k**8 / t**9``:
the average's centre lies at 0.9 ``t`` in a short run of any length, until ``decay`` caps the rule
(``(1 + n) / (10 + n)`` reaches 0.99 after 890 updates, 0.999 after 8,990). Integer buffers
(``num_batches_tracked``) are copied.

BN running statistics are averaged like the weights (timm's ``ModelEmaV2``, YOLOv5's ``ModelEMA``):
free, on the device, and what the averaged weights would roughly see, since the model's running
statistics are themselves an average over its recent weights. Where the run asks for precise BN at an
evaluation (``train.precise_bn_batches`` after training, ``precise_bn_before_eval`` before each), the
training loop recomputes the EMA model's statistics too, over the same batches: then both models are
scored with population statistics of their own weights. Either way the EMA model is a complete model
(its own BN statistics), evaluable and saved on its own.

The update reads nothing back from the device: ``n`` is counted on the host and each step is two
``torch._foreach_*`` calls. Under DDP every rank averages its own unwrapped model: the parameters are
the same on every rank, the BN running statistics are not (each rank's last forward updated them from
its own batch), so :meth:`ModelEma.broadcast` makes rank 0's average every rank's before an evaluation.
Only rank 0's is saved; a resumed run restores it exactly, and the other ranks' copies are replaced by
it before they are used again.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssd.checkpoint import load_state_strict

log = logging.getLogger("ssd.train")


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))  # tf.train.ExponentialMovingAverage's num_updates rule


class ModelEma:
    """``ema.module`` is a copy of ``model`` that :meth:`update` moves towards ``model`` after each step.

    The copy keeps the model's device, dtype and memory format (channels_last), needs no gradients and
    stays in eval mode. ``updates`` counts the updates so far (the warmup's ``n``; saved for resume).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._pairs: tuple[nn.Module, list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    def _tensors(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(ema floats, model floats, ema others, model others), matched by state-dict name; cached: the
        optimizer, BN and ``load_state_dict`` all write these tensors in place."""
        if self._pairs is None or self._pairs[0] is not model:
            own, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
            if own.keys() != theirs.keys():
                raise ValueError("EMA update from a model with other state-dict keys than the EMA copy")
            floats = [k for k, v in own.items() if v.is_floating_point()]
            others = [k for k, v in own.items() if not v.is_floating_point()]
            self._pairs = (
                model,
                [own[k].data for k in floats],
                [theirs[k].data for k in floats],
                [own[k].data for k in others],
                [theirs[k].data for k in others],
            )
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """One step of the average towards ``model`` (the unwrapped module: not DDP, not compiled). A
        ``skip`` flag on the device (1.0: the training step was skipped) leaves every tensor as it was."""
        weight = 1.0 - ema_decay(self.decay, self.updates)
        self.updates += 1
        ema_floats, model_floats, ema_others, model_others = self._tensors(model)
        if skip is None:
            torch._foreach_lerp_(ema_floats, model_floats, weight)  # ema += weight * (model - ema), a host scalar
        else:
            on_device = (1.0 - skip) * weight  # 0 after a skipped step: ema + 0 * (model - ema) is ema, exactly
            for average, current in zip(ema_floats, model_floats, strict=True):
                average.lerp_(current, on_device)
        if ema_others:
            torch._foreach_copy_(ema_others, model_others)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load(self, state: dict[str, Tensor], updates: int, source: str) -> None:
        """Restore a saved average (``state`` from :meth:`state_dict`) and its update count."""
        load_state_strict(self.module, state, source)
        self.updates = int(updates)

    def reset(self, model: nn.Module) -> None:
        """Start the average again from ``model``'s weights (a resume from a checkpoint without one)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Under DDP give every rank rank ``src``'s average (a no-op in a single process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for tensor in self.module.state_dict().values():
            dist.broadcast(tensor, src)


def build_ema(decay: float | None, model: nn.Module) -> ModelEma | None:
    """``train.ema``: a :class:`ModelEma` of ``model`` (already on its device and memory format), or None."""
    if decay is None:
        return None
    log.info(
        "train.ema %g: the weights' moving average is evaluated beside them and is the checkpoints' default", decay
    )
    return ModelEma(model, decay)


def combine_evaluations(ema_res: dict, raw_res: dict) -> dict:
    """One evaluation record of both weights: ``map`` / ``per_class`` are the EMA weights' (what the
    checkpoints use by default, and what ``best.pt`` follows); ``metrics`` holds the metrics.jsonl
    fields that name each: ``weights: "ema"``, ``map_ema``, ``map_raw``, ``per_class_raw``."""
    metrics = {
        "weights": "ema",
        "map_ema": ema_res["map"],
        "map_raw": raw_res["map"],
        "per_class_raw": raw_res["per_class"],
    }
    if "train_sample_map" in raw_res:  # eval.train_sample: the headline one is the EMA weights'
        metrics["train_sample_map_raw"] = raw_res["train_sample_map"]
    return {**ema_res, "metrics": metrics}
