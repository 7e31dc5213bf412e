"""Evaluation inside a training run: the raw weights and, with ``train.ema``, their average, each scored
as ``ssd eval`` scores a checkpoint, precise BN first where the config asks for it; and, with
``eval.train_sample``, the same metric on a fixed sample of the training images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ssd.config import Config
from ssd.data.dataset import DetectionDataset
from ssd.data.loader import EpochIndexSampler
from ssd.engine import bn as bn_tools
from ssd.engine.distributed import DistContext
from ssd.engine.ema import ModelEma, combine_evaluations
from ssd.engine.evalset import evaluate_predictions
from ssd.engine.evaluate import build_eval_loader, evaluate_model
from ssd.engine.monitor import draw_samples
from ssd.engine.step import BatchForward
from ssd.postprocess import PostProcessor
from ssd.preprocess import eval_transform

log = logging.getLogger("ssd.train")

SAMPLE_STREAM = 7  # the training sample's own random stream: numpy's SeedSequence([train.seed, 7])


@dataclass
class TrainEvaluator:
    """``evaluator(it, final)`` -> ``{"map", "metric", "per_class", "samples"[, "metrics"]}`` on rank 0,
    None elsewhere; with ``train.ema`` the EMA weights' result, both named by :func:`combine_evaluations`."""

    cfg: Config
    ctx: DistContext
    model: nn.Module
    ema: ModelEma | None
    frozen: list[str]  # BN layers train.bn / train.freeze keep frozen
    val_set: DetectionDataset
    val_loader: Any
    bn_loader: Any  # precise BN's own loader over the training set
    per_epoch: int  # training batches per epoch
    forward: BatchForward
    postprocessor: PostProcessor
    samples: int = 0  # validation images drawn for TensorBoard
    train_sample: TrainSample | None = None  # eval.train_sample's images and loader

    def __call__(self, it: int, final: bool) -> dict | None:
        bn_tools.broadcast_bn_statistics(self.model)  # DDP: rank 0's statistics on every rank, as last.pt saves them
        res = self.weights(self.model, it, final)
        bn_tools.set_train_mode(self.model, self.cfg.train.bn, self.frozen)
        if self.ema is None:
            return res
        self.ema.broadcast()  # DDP: rank 0's average on every rank (their BN statistics differ)
        ema_res = self.weights(self.ema.module, it, final)
        return ema_res and res and combine_evaluations(ema_res, res)  # both None off the main rank

    def weights(self, m: nn.Module, it: int, final: bool) -> dict | None:
        """``ssd eval``'s :func:`evaluate_model` of ``m``; precise BN first after training
        (or before each evaluation: precise_bn_before_eval)."""
        tcfg, cfg = self.cfg.train, self.cfg
        which = "" if m is self.model else " (EMA weights)"
        if tcfg.precise_bn_batches > 0 and (final or tcfg.precise_bn_before_eval):
            # the current epoch's first batches: a function of `it`
            cast(EpochIndexSampler, self.bn_loader.sampler).set_epoch(it // self.per_epoch)
            n = bn_tools.precise_bn(m, self.bn_loader, self.forward, tcfg.precise_bn_batches, self.frozen)
            log.info("precise BN at iteration %d%s: population statistics over %d batches", it, which, n)
        bn_tools.warn_stale_bn(m, f"evaluation at iteration {it}{which}")
        f = self.forward
        preds = evaluate_model(m, cfg.model, self.val_loader, self.postprocessor, f.device, f.dtype, f.channels_last)
        sample = self.train_sample
        sample_preds = None
        if sample is not None:  # every rank: the predictions are gathered across them
            # an unreadable training image was named by the loop that skipped it
            sample_preds = evaluate_model(
                m, cfg.model, sample.loader, self.postprocessor, f.device, f.dtype, f.channels_last, False
            )
        if not self.ctx.is_main:
            return None
        assert preds is not None  # gathered on the main rank
        # eval.metric auto: VOC07 mAP for VOC-format val data, COCO AP for COCO-format val data
        res = evaluate_predictions(
            self.val_set, preds, cfg.eval.metric, cfg.eval.voc_pixel_convention, cfg.data.val.annotations,
            with_coco_ap=True,
        )  # fmt: skip
        samples = draw_samples(self.val_set, preds, self.samples)
        out = {"map": res["map"], "metric": res["metric"], "per_class": res["per_class"], "samples": samples}
        out |= {"map_50_95": res["map_50_95"], "num_gt": res["num_gt"], "iter": it}
        if sample is not None and sample_preds is not None:  # the validation's metric, on training images
            args = (res["metric"], cfg.eval.voc_pixel_convention, cfg.data.train.annotations)
            on_train = evaluate_predictions(sample.readable(sample_preds), sample_preds, *args)
            out |= {"train_sample_map": on_train["map"], "train_sample_boxes": sum(on_train["num_gt"].values())}
        return out


@dataclass
class TrainSample:
    """A fixed sample of the training images through evaluation's transforms, and its loader."""

    dataset: DetectionDataset
    loader: Any

    def readable(self, predictions: dict) -> DetectionDataset:
        """The sample without the images that could not be read (the training skipped them too)."""
        records = [r for r in self.dataset.records if r.image_id in predictions]
        if len(records) == len(self.dataset.records):
            return self.dataset
        return DetectionDataset(records, self.dataset.classes, self.dataset.transform, train=False)


def build_train_sample(
    train_set: DetectionDataset, cfg: Config, num_workers: int, pin_memory: bool
) -> TrainSample | None:
    """``eval.train_sample`` images of ``train_set`` (all when fewer), drawn once with a generator of their own,
    read by a loader with its own generator too: the run's random streams (augmentation, dropout, the loaders'
    seeds) are the same with the sample or without it."""
    n = min(cfg.eval.train_sample, len(train_set.records))
    if n <= 0:
        return None
    rng = np.random.default_rng([cfg.train.seed, SAMPLE_STREAM])
    chosen = np.sort(rng.choice(len(train_set.records), size=n, replace=False))
    assert cfg.model.input_size is not None  # set by ModelConfig.__post_init__
    transform = eval_transform(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size)
    records = [train_set.records[i] for i in chosen]
    dataset = DetectionDataset(records, train_set.classes, transform, train=False, on_error=train_set.on_error)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = build_eval_loader(
        dataset, cfg.model, cfg.eval.batch_size, num_workers, pin_memory, cfg.data.worker_nice, generator=generator
    )
    return TrainSample(dataset, loader)
