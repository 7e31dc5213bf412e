"""torch.distributed setup from torchrun's environment, and the few collectives the engine needs.

Two process groups: the default one (NCCL on CUDA, gloo on the CPU) carries the tensors of training
(DDP's gradients, the non-finite-step flags, the logged losses); a gloo group on the host carries
the decisions the host makes alone (stop on a signal or the time limit, every step, without touching
the GPU), the gathered predictions and the waits. Its timeout is long (:data:`HOST_TIMEOUT`): the
other ranks wait in it while rank 0 computes a large COCO metric or writes a checkpoint, which can
outlast NCCL's 10-minute collective timeout. A rank that dies is still noticed at once: torchrun
ends the others.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


HOST_TIMEOUT = datetime.timedelta(hours=2)
_host_group: dist.ProcessGroup | None = None  # the gloo group of host-side collectives (see the module docstring)


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``PORT``); NCCL on CUDA, gloo on CPU, plus the host group. A single process needs no group."""
    global _host_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
        assert isinstance(group, dist.ProcessGroup)  # every rank is a member (not GroupMember.NON_GROUP_MEMBER)
        _host_group = group
    return DistContext(rank, world, local_rank)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_true(flag: bool) -> bool:
    """True on every rank only if ``flag`` is true on every rank (e.g. "no stop signal here"): a
    host-side decision, agreed over the host group without touching the GPU."""
    if not _initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_host_group)
    return bool(t.item() > 0)


def gather_objects(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` without a process group."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_host_group)
    return out


def barrier() -> None:
    """Wait for every rank, on the host group (its long timeout: rank 0 may be computing a COCO metric)."""
    if _initialized():
        dist.barrier(group=_host_group)


def cleanup() -> None:
    global _host_group
    if _initialized():
        dist.destroy_process_group()
    _host_group = None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
