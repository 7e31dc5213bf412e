"""The ``train_step`` bench row: one SGD training step of SSD300, ours vs torchvision's ``ssd300_vgg16``.

A step is forward, loss, backward and optimizer step on a fixed batch of 300 px images and targets,
each side as its own recipe fine-tunes SSD300 from ImageNet VGG16 weights: ours as
``configs/ssd300_vgg16_voc0712.yaml`` (no dropout, ``train.freeze: [conv1, conv2]``, Caffe SSD's
``freeze_layers``), torchvision with conv1 frozen (``ssd300_vgg16``'s ``trainable_backbone_layers=4``,
its default with a pretrained backbone). Both with every layer training are timed too.
Ours: the default ``Config().model`` (VGG16 SSD300 without BatchNorm) + ``build_loss`` + ``build_optimizer``,
from the uint8 batch our loader makes (normalised inside the step, as the training loop does). Peer:
torchvision's model in train mode, whose ``forward(images, targets)`` normalises the float [0, 1] images
its references' loader makes and returns the losses; their sum is back-propagated and
``torch.optim.SGD`` steps. Both use the paper's SGD (lr 1e-3, momentum 0.9, weight decay 5e-4).

Checked: every step checked has finite losses and changes every trainable parameter, and
:func:`check_equivalence` shows that our model, loss and optimizer reproduce torchvision's training step
on torchvision's weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from ssd.bench.augment import decode_rgb, synthetic_jpegs
from ssd.bench.model import ssd300_case, torchvision_ssd
from ssd.bench.timing import interleaved, paired_speedup
from ssd.checkpoint import load_state_strict
from ssd.config import Config, LossConfig, ModelConfig, TrainConfig
from ssd.convert.torchvision import convert_torchvision, torchvision_key_map, torchvision_model_config
from ssd.data.transforms import normalize_batch
from ssd.device import retain_freed_memory
from ssd.engine.finetune import freeze_blocks
from ssd.engine.optim import build_optimizer
from ssd.loss import build_loss
from ssd.model import build_ssd
from ssd.ops.boxes import pad_targets

if TYPE_CHECKING:
    from torchvision.models.detection import SSD as TorchvisionSSD

# the paper's SGD (Sec. 3; TrainConfig's defaults)
SGD: dict[str, Any] = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
OUR_FREEZE = ["conv1", "conv2"]  # configs/ssd300_vgg16_voc0712.yaml (Caffe SSD's freeze_layers)
SIZE = 300
CHANNELS_LAST, NCHW = torch.channels_last, torch.contiguous_format


def train_batch(batch: int, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """The inputs of one training step at 300 px.

    ``images``: uint8 ``Tensor[B, 3, 300, 300]``, NHWC in memory as our loader's batches (synthetic
    500x375 JPEGs decoded and resized). ``targets``: torchvision's (boxes in pixels, labels 1..20);
    ``gt_boxes`` / ``gt_labels``: the same, padded and normalised for our loss. The boxes are drawn by
    :func:`ssd300_case` free of IoU ties with torchvision's anchors, not from the pictures' rectangles:
    a step costs the same wherever the objects are, and a tie would make :func:`check_equivalence` a
    coin toss.
    """
    pictures = []
    for jpeg, _, _ in synthetic_jpegs(batch, seed):
        rgb = decode_rgb(jpeg)
        pictures.append(cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
    images = torch.from_numpy(np.stack(pictures)).to(device)
    images = images.permute(0, 3, 1, 2)  # [B, 3, H, W], NHWC in memory
    _, _, targets, _ = ssd300_case(batch, seed=seed)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    gt_boxes, gt_labels = pad_targets([t["boxes"] / SIZE for t in targets], [t["labels"] for t in targets])
    return {"images": images, "targets": targets, "gt_boxes": gt_boxes, "gt_labels": gt_labels}


class RepeatableStep:
    """One training step of ``model`` on fixed inputs, repeatable from the same weights.

    ``losses_fn()`` runs the forward and returns the named loss terms; :meth:`step` adds the backward
    and the optimizer step (through ``scaler``, a ``GradScaler``, for fp16) and returns the detached
    terms. :meth:`reset` puts the weights back to what they were at construction, so every timed step
    does the same arithmetic: torchvision's randomly initialised model sees its input in 0..255 units
    and diverges within a few SGD steps at lr 1e-3 (loss 114, 3e3, 1e7, ...). The optimizer keeps its
    momentum buffers, so a step after the first is a steady-state step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        losses_fn: Callable[[], dict[str, Tensor]],
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.losses_fn = losses_fn
        self.scaler = scaler
        self.initial = [p.detach().clone() for p in model.parameters()]

    def step(self) -> dict[str, Tensor]:
        losses = self.losses_fn()
        loss = cast(Tensor, sum(losses.values()))  # a non-empty dict of tensors: never sum's start 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return {k: v.detach() for k, v in losses.items()}

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.model.parameters(), self.initial, strict=True):
                p.copy_(p0)


def check_step(step: RepeatableStep, name: str, tries: int = 10) -> dict[str, float]:
    """Run one step and check it: finite losses, a gradient for every trainable parameter, and every
    trainable parameter changed, except one that is zero with a zero gradient (a bias of a level no
    matched or mined prior fell on: SGD with weight decay rightly leaves it at zero).

    A step that a ``GradScaler`` skipped (non-finite fp16 gradients at its current scale, which it then
    lowers) is run again, up to ``tries`` times, as training would. Returns the losses; raises
    ``AssertionError`` naming what failed.
    """
    params = [(n, p) for n, p in step.model.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for _, p in params]
    for _ in range(tries):
        scale = step.scaler.get_scale() if step.scaler is not None else None
        losses = {k: float(v) for k, v in step.step().items()}
        if scale is None or step.scaler is None or step.scaler.get_scale() >= scale:
            break
    bad = [k for k, v in losses.items() if not np.isfinite(v)]
    assert not bad, f"{name}: non-finite loss {', '.join(bad)}: {losses}"
    no_grad = [n for n, p in params if p.grad is None]
    assert not no_grad, f"{name}: no gradient reached {len(no_grad)} parameters: {', '.join(no_grad[:5])}"
    same = [
        n
        for (n, p), p0 in zip(params, before, strict=True)
        if torch.equal(p.detach(), p0) and (bool(p0.any()) or (p.grad is not None and bool(p.grad.any())))
    ]
    assert not same, (
        f"{name}: the step left {len(same)} of {len(params)} trainable parameters unchanged: {', '.join(same[:5])}"
    )
    return losses


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` (bf16 / fp16), or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def our_step(
    model_cfg: ModelConfig, batch: dict, memory_format: torch.memory_format, dtype=None, freeze: Sequence[str] = ()
) -> RepeatableStep:
    """Our model (``model_cfg``), loss and SGD, from the uint8 batch as the training loop runs them
    (the loop puts the network under autocast, the loss outside); ``freeze``: ``train.freeze``."""
    device = batch["images"].device
    torch.manual_seed(0)
    # Module.to's stubs lack to(device, memory_format=), which it accepts
    model = build_ssd(model_cfg).to(device, memory_format=memory_format).train()  # type: ignore[call-overload]
    freeze_blocks(model, list(freeze))
    criterion = build_loss(LossConfig(), model_cfg)
    optimizer = build_optimizer(TrainConfig(optimizer="sgd", **SGD), model)
    images = batch["images"].contiguous(memory_format=memory_format)

    def losses() -> dict[str, Tensor]:
        x = normalize_batch(images, model_cfg.preprocess)
        with autocast(device, dtype):
            outputs = model(x)
        return criterion(outputs, batch["gt_boxes"], batch["gt_labels"], model.priors)

    return RepeatableStep(model, optimizer, losses, grad_scaler(device, dtype))


def random_torchvision_ssd() -> TorchvisionSSD:
    """torchvision's ``ssd300_vgg16``, 21 classes as ours, random weights (seed 0)."""
    torch.manual_seed(0)
    return torchvision_ssd(21)


def peer_step(
    batch: dict,
    memory_format: torch.memory_format,
    dtype=None,
    tv: TorchvisionSSD | None = None,
    freeze_conv1: bool = False,
) -> RepeatableStep:
    """torchvision's ``ssd300_vgg16`` (a copy of ``tv``, default :func:`random_torchvision_ssd`) in
    train mode, with ``torch.optim.SGD``. ``freeze_conv1``: what its ``trainable_backbone_layers=4``
    (the default with a pretrained backbone) freezes: the layers before the first max-pool."""
    device = batch["images"].device
    model = copy.deepcopy(tv) if tv is not None else random_torchvision_ssd()
    model = model.to(device, memory_format=memory_format).train()
    if freeze_conv1:
        features = model.backbone.features
        first_pool = next(i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d))
        for p in features[:first_pool].parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **SGD)
    # float [0, 1] CHW images, as the references' loader hands them over (ToDtype(float, scale=True))
    images = [im.contiguous().float().div_(255.0) for im in batch["images"]]

    def losses() -> dict[str, Tensor]:
        with autocast(device, dtype):
            return model(images, batch["targets"])

    return RepeatableStep(model, optimizer, losses, grad_scaler(device, dtype))


def grad_scaler(device: torch.device, dtype) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


# --- equivalence: our stack on torchvision's weights ---------------------------------------------


def check_equivalence(batch: dict, tv: TorchvisionSSD | None = None) -> dict[str, float]:
    """Our model, loss and SGD on torchvision's weights reproduce torchvision's training step.

    torchvision's randomly initialised ``ssd300_vgg16`` (21 classes) is converted into ours
    (``convert_torchvision``: ``torchvision_model_config``, no dropout, its priors and preprocessing).
    Checked, in fp32 on the CPU:

    - preprocessing: our ``normalize_batch`` of the uint8 batch equals torchvision's transform of the
      float images to 1e-4 (a float32 ulp of values up to 255: ``x * (1/255)`` vs ``x / 255``);
    - one step each on the same network input: loss terms within rtol 1e-5, atol 1e-5 (``loc`` =
      ``bbox_regression``, ``conf`` = ``classification``), and every parameter's SGD update within
      1e-4 of that parameter's largest update (measured: 2e-6).

    Why the same input, and both in NCHW: on this network (random weights, input in 0..255 units,
    through L2Norm) the gradients of the layers below conv4_3 are so conditioned that any change in
    the order of a sum moves them by ~1e-3 of their largest entry. Measured at batch 2: NCHW and
    channels_last steps each differ from a float64 one by 1e-3 to 9e-3 there, and from each other by
    up to 6e-3; our preprocessing's one-ulp difference, which moves the logits by ~1e-6, also swaps
    near-tied hard negatives at the mining cut-off (2.8e-3). The loss values agree to ~1e-7 in every
    case. Where both sides do the same arithmetic the updates agree to 2e-6, which is what this
    checks; the timed channels_last step is checked by :func:`check_step`.
    ``tv``: the 21-class torchvision model to start from (copied, not changed; default: a new random
    one). Returns the largest differences found.
    """
    tv = copy.deepcopy(tv) if tv is not None else random_torchvision_ssd()
    tv.train()
    cfg = torchvision_model_config(21)
    ours = build_ssd(cfg)
    load_state_strict(ours, convert_torchvision(tv.state_dict())["model"], "torchvision ssd300_vgg16")
    ours.train()
    images = [im.contiguous().float().div_(255.0) for im in batch["images"]]
    with torch.no_grad():
        x_tv = tv.transform(images, None)[0].tensors
    x_ours = normalize_batch(batch["images"], cfg.preprocess)
    preprocess_diff = float((x_ours - x_tv).abs().max())
    assert preprocess_diff <= 1e-4, f"preprocessing differs from torchvision's by {preprocess_diff}"

    criterion = build_loss(LossConfig(), cfg)
    mine = RepeatableStep(
        ours,
        build_optimizer(TrainConfig(optimizer="sgd", **SGD), ours),
        lambda: criterion(ours(x_tv), batch["gt_boxes"], batch["gt_labels"], ours.priors),
    )
    theirs = RepeatableStep(tv, torch.optim.SGD(tv.parameters(), **SGD), lambda: tv(images, batch["targets"]))
    lo, lt = mine.step(), theirs.step()
    loss_diff = 0.0
    for a, b in ((lo["loc"], lt["bbox_regression"]), (lo["conf"], lt["classification"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        loss_diff = max(loss_diff, float((a - b).abs()))
    return {
        "preprocess_max_abs_diff": preprocess_diff,
        "loss_max_abs_diff": loss_diff,
        "update_max_rel_diff": compare_updates(mine, theirs),
    }


def compare_updates(ours: RepeatableStep, tv: RepeatableStep, tolerance: float = 1e-4) -> float:
    """Largest difference between our and torchvision's update of a parameter (weights after the step
    minus before), relative to the largest entry of torchvision's update; asserts <= ``tolerance``."""
    key_map = torchvision_key_map(6)
    mine = {n: (p, p0) for (n, p), p0 in zip(ours.model.named_parameters(), ours.initial, strict=True)}
    worst = 0.0
    for (name, p), p0 in zip(tv.model.named_parameters(), tv.initial, strict=True):
        q, q0 = mine.pop(key_map[name])
        theirs, own = p.detach() - p0, q.detach() - q0
        diff, scale = float((own - theirs).abs().max()), float(theirs.abs().max())
        if scale == 0:  # a zero bias no gradient reached: ours must stay put as well
            rel = 0.0 if diff == 0 else float("inf")
        else:
            rel = diff / scale
        assert rel <= tolerance, f"{key_map[name]}: update differs from torchvision's {name} by {rel:.2e}"
        worst = max(worst, rel)
    assert not mine, f"parameters torchvision's model does not have: {sorted(mine)}"
    return worst


# --- the rows ------------------------------------------------------------------------------------


def time_steps(steps: dict[str, RepeatableStep], rounds: int, cuda: bool = False) -> dict[str, list[float]]:
    """Times (seconds) of ``rounds`` rounds of interleaved steps, every one from the same weights:
    ``times[name][i]`` is that step's time in round ``i``."""
    fns = {k: s.step for k, s in steps.items()}
    return interleaved(fns, rounds, before={k: s.reset for k, s in steps.items()}, cuda=cuda)


def make_steps(
    model_cfg: ModelConfig, data: dict, dtype=None, tv: TorchvisionSSD | None = None
) -> dict[str, RepeatableStep]:
    """Each side's fine-tuning recipe (module docstring): ours in channels_last (and NCHW: what
    channels_last buys), torchvision (copies of ``tv``) in both formats; and both in channels_last
    with every layer training (``*_all_layers``)."""
    tv = tv if tv is not None else random_torchvision_ssd()
    return {
        "ours": our_step(model_cfg, data, CHANNELS_LAST, dtype, OUR_FREEZE),
        "ours_nchw": our_step(model_cfg, data, NCHW, dtype, OUR_FREEZE),
        "peer_nchw": peer_step(data, NCHW, dtype, tv, freeze_conv1=True),
        "peer_channels_last": peer_step(data, CHANNELS_LAST, dtype, tv, freeze_conv1=True),
        "ours_all_layers": our_step(model_cfg, data, CHANNELS_LAST, dtype),
        "peer_all_layers": peer_step(data, CHANNELS_LAST, dtype, tv),
    }


def faster_peer(times: dict[str, list[float]]) -> str:
    """The peer's memory format with the fastest step in ``times``: ``peer_nchw`` or ``peer_channels_last``."""
    return min(("peer_nchw", "peer_channels_last"), key=lambda k: min(times[k]))


def step_row(name: str, times: dict[str, list[float]], batch: int, target: float | None) -> dict:
    """A row from the rounds' step times (:func:`time_steps`): each side's fastest step per image, the
    peer in its faster memory format, and ``speedup`` the median of the paired per-round ratios
    (:func:`ssd.bench.timing.paired_speedup`); ``fastest_ratio`` is the ratio of the fastest steps."""
    per_image = {k: min(v) / batch for k, v in times.items()}
    peer_format = faster_peer(times)
    return {
        "name": name,
        "ours_s": per_image["ours"],
        "peer": f"torchvision 0.29 ssd300_vgg16 train step, {peer_format[len('peer_') :]}",
        "peer_s": per_image[peer_format],
        "speedup": paired_speedup(times["ours"], times[peer_format]),
        "fastest_ratio": per_image[peer_format] / per_image["ours"],
        "rounds": len(times["ours"]),
        "target": target,
        "batch": batch,
        "ours_nchw_s": per_image["ours_nchw"],
        "peer_nchw_s": per_image["peer_nchw"],
        "peer_channels_last_s": per_image["peer_channels_last"],
        "ours_all_layers_s": per_image.get("ours_all_layers"),
        "peer_all_layers_s": per_image.get("peer_all_layers"),
    }


STEP_KEYS = ("ours_nchw_s", "peer_nchw_s", "peer_channels_last_s", "ours_all_layers_s", "peer_all_layers_s")


def formats_note(row: dict) -> str:
    ms = {k[: -len("_s")]: row[k] * 1e3 for k in STEP_KEYS}
    return (
        f"speedup = median of {row['rounds']} paired per-round ratios (fastest steps: "
        f"{row['fastest_ratio']:.2f}x); ours NCHW {ms['ours_nchw']:.1f} ms; torchvision NCHW {ms['peer_nchw']:.1f} ms, "
        f"channels_last {ms['peer_channels_last']:.1f} ms; every layer training (channels_last): ours "
        f"{ms['ours_all_layers']:.1f} ms, torchvision {ms['peer_all_layers']:.1f} ms "
        f"({ms['peer_all_layers'] / ms['ours_all_layers']:.2f}x)"
    )


def bench_train_step(repeats: int, batch: int = 8) -> dict:
    """One training step of SSD300 at batch 8, fp32 on the CPU, per image (step time / batch), each
    side as its recipe fine-tunes (module docstring) and in its best memory format: ours channels_last,
    torchvision timed in NCHW and channels_last and the faster counted. Each of the six steps runs once
    checked and untimed (:func:`check_step`; it also warms up), then 2 timed rounds of all six give the
    side figures and the peer's faster format, then ``2 * repeats`` rounds (6 to 16; a step takes ~6 s
    here) of ours and that format alone, back to back in alternating order: on this shared machine one
    step's time varies by +-15% from one step to the next, so the headline needs more pairs than the
    side figures (:func:`step_row` makes the figures from all rounds). Before them,
    :func:`check_equivalence` on 2 images. The process runs with the training engine's allocator setting
    (``train.retain_host_memory``, on by default: freed memory stays in the process), for both sides."""
    retain_freed_memory()
    model_cfg = dataclasses.replace(Config().model, dropout=0.0)  # the paper's SSD300 (its configs: no dropout)
    assert not model_cfg.batch_norm, f"the default model has BatchNorm in {model_cfg.batch_norm}"
    # built once and copied: its VGG16 classifier alone, built and dropped, is 120M weights
    tv = random_torchvision_ssd()
    equivalence = check_equivalence(train_batch(min(batch, 2), seed=1), tv)
    steps = make_steps(model_cfg, train_batch(batch), tv=tv)
    del tv
    losses = {name: check_step(s, name) for name, s in steps.items()}
    times = time_steps(steps, 2)
    peer = faster_peer(times)
    headline = time_steps({"ours": steps["ours"], peer: steps[peer]}, min(max(2 * repeats, 6), 16))
    for name, t in headline.items():
        times[name] += t
    row = step_row("train_step", times, batch, 1.15)
    note = (
        f"per image, steps of {batch}; {formats_note(row)}; on torchvision's weights our step "
        f"equals its step (losses within {equivalence['loss_max_abs_diff']:.1e}, "
        f"updates within {equivalence['update_max_rel_diff']:.1e} relative)"
    )
    return {**row, "losses": losses, "equivalence": equivalence, "note": note}


def bench_train_step_cuda(repeats: int, batch: int = 32) -> list[dict]:
    """``train_step`` on the GPU at batch 32 under autocast, bf16 and fp16 (a GradScaler on both
    sides), per image; the fastest of ``max(10, 3 * repeats)`` interleaved steps after 3 warm-up
    steps each (cuDNN's algorithm search runs in the first, as ``train`` sets ``cudnn.benchmark``).
    Each row also carries the GPU report (:func:`ssd.bench.cuda.gpu_report`) of our rate."""
    from ssd.bench.cuda import describe, gpu_report, matmul_tflops

    model_cfg = dataclasses.replace(Config().model, dropout=0.0)
    data = train_batch(batch, device="cuda")
    matmul = matmul_tflops()
    rows = []
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            steps = make_steps(model_cfg, data, dtype)
            losses = {name: check_step(s, f"{name} {label}") for name, s in steps.items()}
            time_steps(steps, 2, cuda=True)  # more warm-up
            times = time_steps(steps, max(10, 3 * repeats), cuda=True)
            # no target on the GPU: the target is the CPU's
            row = step_row(f"train_step_{label}", times, batch, None)
            report = gpu_report(1.0 / row["ours_s"], matmul)
            note = f"autocast {label}, per image, steps of {batch}; {formats_note(row)}; {describe(report)}"
            rows.append({**row, **report, "losses": losses, "note": note})
            del steps
            torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return rows
