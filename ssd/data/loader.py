"""DataLoaders for training and evaluation.

Augmentation randomness is a pure function of (seed, epoch, sample index): the sampler yields
``epoch * len(dataset) + index`` and the dataset seeds the transform from it. So a run is
reproducible whatever the number of workers, and a resumed run sees the same augmented
images as an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from ssd.data.dataset import DetectionDataset, collate


class EpochIndexSampler(Sampler[int]):
    """Shuffled (or ordered) indices of one epoch, encoded as ``epoch * n + index``.

    Under ``torch.distributed`` each rank takes every ``world``-th index of the same permutation
    (when shuffling, padded to equal length as ``DistributedSampler`` does, so every rank runs
    the same number of steps; in order, unpadded, so evaluation sees every image exactly once).
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch = 0
        self.skip = 0  # samples of this rank to skip at the start of the next iteration (resume mid-epoch)
        self.per_rank = -(-n // world) if shuffle else len(range(rank, n, world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            pad = self.per_rank * self.world - self.n  # pad so every rank gets per_rank items (even if world > n)
            order += (order * -(-pad // max(1, self.n)))[:pad]
        else:
            order = list(range(self.n))
        base = self.epoch * self.n
        mine = order[self.rank :: self.world][self.skip :]
        self.skip = 0
        return iter([base + i for i in mine])


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lower_priority(increment: int, worker_id: int) -> None:
    os.nice(increment)


def build_dataloader(
    dataset: DetectionDataset,
    batch_size: int,
    train: bool,
    num_workers: int = 4,
    seed: int = 0,
    pin_memory: bool = False,
    distributed: bool | None = None,
    worker_nice: int = 0,
    persistent: bool = True,
    collate_fn: Callable[[list[dict]], dict] = collate,
) -> DataLoader:
    """A loader of collated batches (see :func:`ssd.data.dataset.collate`; ``collate_fn`` replaces it).

    Training shuffles, drops the last partial batch and seeds augmentation per sample; evaluation
    keeps order. Under ``torch.distributed`` (auto-detected) each rank reads its own shard.
    ``worker_nice`` lowers the workers' CPU priority (``os.nice``; ignored where there is none).
    ``persistent`` keeps the workers between iterations. A persistent loader has *one* iterator:
    iterating it again (even from inside a loop over it) restarts that iterator, so anything that
    reads batches besides the training loop (precise BN) needs a loader of its own.
    """
    rank, world = dist_info() if distributed in (None, True) else (0, 1)
    sampler = EpochIndexSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world=world)
    dataset.seed = seed
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=functools.partial(_lower_priority, worker_nice) if worker_nice and hasattr(os, "nice") else None,
    )
