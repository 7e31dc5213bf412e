"""The training sections: ``loss`` (what training minimises) and ``train`` (how it runs).

Every default of the sections lives in these dataclasses; ``__post_init__`` checks values and names
the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssd.config.io import ConfigError, check_choice

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")
AMP_MODES = ("fp16", "bf16", "none")
BN_MODES = ("train", "frozen", "sync")
CHANNELS_LAST = ("auto", "true", "false")
FREEZE_BLOCKS = ("conv1", "conv2", "conv3", "conv4", "conv5")


@dataclass
class LossConfig:
    """Matching and MultiBox loss (paper Sec. 2.2)."""

    iou_threshold: float = 0.5  # a prior is positive for its best ground truth at IoU >= this
    neg_pos_ratio: float = 3.0  # hard negative mining: background priors kept per positive of the image
    box_weight: float = 1.0  # alpha in the paper's L = (L_conf + alpha L_loc) / N

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"loss.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.neg_pos_ratio < 0:
            raise ConfigError(f"loss.neg_pos_ratio must be >= 0, got {self.neg_pos_ratio}")


@dataclass
class TrainConfig:
    """Iteration-based training: optimiser, schedule, precision, BatchNorm handling, periods and limits."""

    max_iter: int = 120000  # optimiser steps
    # the global batch, split evenly across processes, so a recipe means the same thing on 1 or 8 GPUs
    batch_size: int = 32
    lr: float = 1e-3  # the base learning rate; the schedule multiplies it
    optimizer: str = "sgd"  # sgd (the paper) | adamw
    momentum: float = 0.9  # SGD's (AdamW has none)
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False  # no weight decay on BN and bias parameters (the L2Norm scale keeps it)
    schedule: str = "multistep"  # multistep (times gamma at each of steps) | cosine (to 0 at max_iter)
    steps: list[int] = field(default_factory=lambda: [80000, 100000])  # multistep's iterations
    gamma: float = 0.1  # multistep's factor at each step
    warmup_iters: int = 500  # linear warmup of the learning rate from warmup_factor times it
    warmup_factor: float = 1.0 / 3.0
    clip_grad_norm: float | None = None  # the gradients' largest total norm; null: no clipping
    amp: str = "fp16"  # fp16 | bf16 | none; applies on CUDA only (fp32 on CPU)
    # NHWC activations: ``auto`` is on for the CPU and CUDA, where it is faster (docs/measurements.md,
    # "Machine rules"), off elsewhere; ``true`` / ``false`` force it (read as the strings "true" / "false")
    channels_last: str | bool = "auto"
    compile: bool = False  # torch.compile the network
    # (CUDA) steps between log steps run under ``torch.cuda.set_sync_debug_mode("error")``, so any
    # host-device synchronisation in a steady-state step raises (a check, not for production runs)
    sync_debug: bool = False
    # VGG16 blocks that do not train, e.g. [conv1, conv2]: Caffe SSD's ``freeze_layers`` when fine-tuning
    # from ImageNet weights (the paper's recipe); a frozen prefix of the network also gets no backward pass
    freeze: list[str] = field(default_factory=list)
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda (each process its LOCAL_RANK's GPU) | cuda:N
    seed: int = 0  # seeds Python, NumPy, torch and the loader workers
    deterministic: bool = False  # torch's deterministic algorithms (warn only) and no cuDNN autotuning
    checkpoint_period: int = 5000  # iterations between checkpoints
    eval_period: int = 10000  # iterations between evaluations on data.val (one more follows training)
    log_period: int = 20  # iterations between log rows
    # ``train`` (batch statistics), ``frozen`` (the BN layers whose running statistics came from
    # ``model.init`` / ``init_backbone`` keep them and fixed affine parameters; the others train),
    # ``sync`` (SyncBatchNorm under DDP)
    bn: str = "train"
    # > 0: recompute the population statistics of the training BN layers over that many training
    # batches (its own loader) after training
    precise_bn_batches: int = 0
    precise_bn_before_eval: bool = False  # precise BN before every evaluation too
    # a decay in (0, 1), e.g. 0.999 (null: off): keep an exponential moving average of the weights,
    # evaluated beside them; the checkpoints' default weights are then the average (:mod:`ssd.engine.ema`).
    # Warmed up: the decay of update n is min(ema, (1 + n) / (10 + n))
    ema: float | None = None
    max_bad_steps: int = 10  # consecutive non-finite losses before training stops
    time_limit: float | None = None  # seconds of training, counted across resumes; stops early (the CPU demo's budget)
    schedule_by_time: bool = False  # the schedule follows the larger of iterations and time_limit spent (not bit-exact)
    retain_host_memory: bool = True  # keep freed host memory for the next step (glibc; ~7% faster CPU steps)
    tensorboard: bool = True  # OUTPUT_DIR/tensorboard: scalars + drawn validation images, if tensorboard is installed
    tensorboard_images: int = 4  # validation images drawn at every evaluation

    def __post_init__(self) -> None:
        if isinstance(self.channels_last, bool):  # YAML `channels_last: true`, and configs written before "auto"
            self.channels_last = str(self.channels_last).lower()
        check_choice("train.channels_last", self.channels_last, CHANNELS_LAST)
        for block in self.freeze:
            check_choice("train.freeze", block, FREEZE_BLOCKS)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_choice("train.amp", self.amp, AMP_MODES)
        check_choice("train.bn", self.bn, BN_MODES)
        for name in ("max_iter", "batch_size", "checkpoint_period", "eval_period", "log_period", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"train.ema must be a decay in (0, 1), e.g. 0.999, or null (off); got {self.ema}")
        if self.schedule_by_time and not self.time_limit:
            raise ConfigError("train.schedule_by_time needs train.time_limit (seconds)")
