"""DataLoaders for training and evaluation.

Augmentation randomness is a pure function of (seed, epoch, sample index): the sampler yields
``epoch * len(dataset) + index`` and the dataset seeds the transform from it. So a run is
reproducible whatever the number of workers, and a resumed run sees the same augmented
images as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from ssd.data.dataset import DetectionDataset, collate


class EpochIndexSampler(Sampler[int]):
    """Shuffled (or ordered) indices of one epoch, encoded as ``epoch * n + index``.

    Under ``torch.distributed`` each rank takes every ``world``-th index of the same permutation
    (when shuffling, padded to equal length as ``DistributedSampler`` does, so every rank runs
    the same number of steps; in order, unpadded, so evaluation sees every image exactly once).

    ``passes`` > 1 makes one sampler epoch several passes over the data, each shuffled as its own epoch
    ``epoch * passes + p``: a training set smaller than one batch then fills whole batches that carry on
    from one pass to the next (:func:`passes_for_batch`).
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, passes: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.passes = passes
        self.epoch = 0
        self.skip = 0  # samples of this rank to skip at the start of the next iteration (resume mid-epoch)
        self.per_pass = -(-n // world) if shuffle else len(range(rank, n, world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_pass * self.passes

    def __iter__(self) -> Iterator[int]:
        mine = []
        for p in range(self.passes):
            mine += self.one_pass(self.epoch * self.passes + p)
        mine = mine[self.skip :]
        self.skip = 0
        return iter(mine)

    def one_pass(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            pad = self.per_pass * self.world - self.n  # pad so every rank gets per_pass items (even if world > n)
            order += (order * -(-pad // max(1, self.n)))[:pad]
        else:
            order = list(range(self.n))
        return [epoch * self.n + i for i in order[self.rank :: self.world]]


def passes_for_batch(per_rank: int, batch_size: int) -> int:
    """Passes per sampler epoch: 1 when a rank's share fills at least one batch; otherwise the fewest
    passes that fill whole batches exactly (lcm / share), so no image is dropped with a partial batch."""
    if per_rank >= batch_size or per_rank == 0:
        return 1
    return math.lcm(per_rank, batch_size) // per_rank


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_worker(nice_increment: int, owner_pid: int, worker_id: int) -> None:
    """Stopping is the main process's decision: a worker ignores SIGINT, and SIGTERM from anyone but
    the process that owns it (``owner_pid``, or its parent).

    A signal sent to the whole process group (Ctrl-C, ``timeout``, Slurm, ``docker stop``) would
    otherwise kill the workers first, and the main process would die of their death (the DataLoader's
    "worker is killed by signal" error, raised from its SIGCHLD handler wherever the main process
    happens to be) instead of finishing its step and saving. SIGTERM cannot simply be ignored: the
    owner's ``multiprocessing`` ends a loader still alive at interpreter exit with ``terminate()``
    (SIGTERM) and then waits for it, so a worker ignoring it would hang that exit. So SIGTERM is
    blocked and a thread takes it with its sender (``sigwaitinfo``); the owner's ends the worker.
    Should the main process die, the DataLoader's watchdog ends its workers; SIGKILL ends one at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Unix
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
        owners = {owner_pid, os.getppid()}
        threading.Thread(target=_end_on_owner_sigterm, args=(owners,), name="sigterm", daemon=True).start()
    if nice_increment and hasattr(os, "nice"):
        os.nice(nice_increment)


def _end_on_owner_sigterm(owners: set[int]) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid in owners:
            os._exit(0)  # terminate(): the owner is done with this worker (exit 0: its SIGCHLD handler stays quiet)


MAX_AUTO_WORKERS = 8


def default_num_workers(num_workers: int | None) -> int:
    """``data.num_workers``: the value set, or when unset (None) this machine's share: the CPUs this
    process may run on, divided among the training processes on the machine (torchrun's
    ``LOCAL_WORLD_SIZE``), at least 1 and at most ``MAX_AUTO_WORKERS``."""
    if num_workers is not None:
        return num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cpus // max(1, processes)))


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
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A loader of collated batches (see :func:`ssd.data.dataset.collate`; ``collate_fn`` replaces it).

    Training shuffles, drops the last partial batch (a set smaller than one batch is read in several passes
    per epoch: :func:`passes_for_batch`) and seeds augmentation per sample; evaluation
    keeps order. Under ``torch.distributed`` (auto-detected) each rank reads its own shard.
    ``worker_nice`` lowers the workers' CPU priority (``os.nice``; ignored where there is none). Workers
    ignore SIGINT and SIGTERM from anyone but their owner (:func:`_init_worker`).
    ``generator`` seeds the loader's iterators (their workers' base seed): without one each iteration draws
    it from torch's global random state. ``persistent`` keeps the workers between iterations. A
    persistent loader has *one* iterator: iterating it again (even from inside a loop over it) restarts
    that iterator, so anything that reads batches besides the training loop (precise BN) needs a loader
    of its own.
    """
    rank, world = dist_info() if distributed in (None, True) else (0, 1)
    passes = passes_for_batch(-(-len(dataset) // world), batch_size) if train else 1
    sampler = EpochIndexSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world=world, passes=passes)
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
        worker_init_fn=functools.partial(_init_worker, worker_nice, os.getpid()),
        generator=generator,
    )
