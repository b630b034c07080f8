"""``launch``: run a function in one process per device, as ``detectron2.engine.launch``.

With CUDA each process drives one GPU through NCCL; without CUDA the processes use gloo on the
CPU (``--num-gpus 2`` on a CPU machine runs two processes), which is how CI exercises the
distributed code paths.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import comm

__all__ = ["DEFAULT_TIMEOUT", "launch"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _find_free_port() -> int:
    """A TCP port free on this machine right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``.

    Args:
        main_func: a module-level function (processes are spawned: it must be picklable).
        num_gpus_per_machine: processes on this machine (one per GPU; on a CPU machine, CPU processes).
        num_machines: machines taking part.
        machine_rank: this machine's index in ``[0, num_machines)``.
        dist_url: the process-group rendezvous, e.g. ``tcp://host:port`` (the same on every
            machine); ``"auto"`` (or ``None``) picks a free local port, for one machine only.
        args: arguments of ``main_func``.
        timeout: timeout of the collective operations.

    With a world size of 1, ``main_func(*args)`` is called directly, in this process.
    """
    if num_gpus_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(
            f"launch got num_gpus_per_machine={num_gpus_per_machine}, num_machines={num_machines}, "
            f"machine_rank={machine_rank}; expected counts >= 1 and 0 <= machine_rank < num_machines."
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError(
                f"dist_url={dist_url!r} picks a local port, which only works on one machine; with "
                f"num_machines={num_machines} pass the same tcp://<address of machine 0>:<port> to every machine."
            )
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable rendezvous across machines (%s); prefer tcp://.", dist_url)
    mp.start_processes(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args), timeout),
        daemon=False,
        start_method="spawn",
    )


def _distributed_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        if num_gpus_per_machine > torch.cuda.device_count():
            raise ValueError(
                f"--num-gpus {num_gpus_per_machine} but this machine has {torch.cuda.device_count()} visible GPUs."
            )
        torch.cuda.set_device(local_rank)
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="nccl" if has_gpu else "gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Could not join the process group at %s (rank %d of %d)", dist_url, global_rank, world_size)
        raise
    try:
        # Every process takes part in creating every machine's group; each keeps its own machine's.
        num_machines = world_size // num_gpus_per_machine
        for machine in range(num_machines):
            ranks = list(range(machine * num_gpus_per_machine, (machine + 1) * num_gpus_per_machine))
            group = dist.new_group(ranks)
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        comm.synchronize()
        main_func(*args)
        comm.synchronize()  # no rank takes the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # The work is done and this rank has left the group: end the process here, with the logs flushed.
    # Python's own finalization after that (gloo's threads and the tensors they hold torn down in no
    # set order) has aborted a worker at random in CI after a complete, correct run (SIGABRT,
    # "terminate called without an active exception"), and spawn's parent reads only the exit code.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
