"""Process-group helpers with the names of ``detectron2.utils.comm``.

Everything works without ``torch.distributed`` being initialised (a single process is world size 1).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "gather",
    "get_local_rank",
    "get_local_size",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "shared_random_seed",
    "synchronize",
]

# Set by ``launch``: the group of processes on this machine.
_LOCAL_PROCESS_GROUP = None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_local_rank() -> int:
    """Rank of this process among the processes of its machine."""
    if not _initialized():
        return 0
    assert _LOCAL_PROCESS_GROUP is not None, "launch() sets the local process group"
    return dist.get_rank(group=_LOCAL_PROCESS_GROUP)


def get_local_size() -> int:
    """Number of processes on this machine."""
    if not _initialized():
        return 1
    assert _LOCAL_PROCESS_GROUP is not None, "launch() sets the local process group"
    return dist.get_world_size(group=_LOCAL_PROCESS_GROUP)


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op with one process."""
    if get_world_size() > 1:
        dist.barrier()


@functools.lru_cache()
def _cpu_group():
    """A gloo group: object collectives need it when the default backend is NCCL."""
    if dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(data: Any, group=None) -> list[Any]:
    """Gather any picklable object from every rank; returns the list on every rank."""
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _cpu_group()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, data, group=group)
    return out


def gather(data: Any, dst: int = 0, group=None) -> list[Any]:
    """Gather any picklable object to rank ``dst``: the list there, ``[]`` on other ranks."""
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _cpu_group()
    if dist.get_rank() == dst:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.gather_object(data, out, dst=dst, group=group)
        return out
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def shared_random_seed() -> int:
    """A random int drawn on rank 0 and shared by all ranks (so samplers agree)."""
    ints = np.random.randint(2**31)
    return int(all_gather(ints)[0])


