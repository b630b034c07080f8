"""The training-loop choices of ``train_net.py`` that depend on the device, the same in both backends.

Detectron2's ``create_ddp_model`` gives ``DistributedDataParallel`` ``device_ids=[local rank]``,
which DDP rejects for a model on the CPU, and its ``AMPTrainer`` requires CUDA. So the project
decides here, and calls the seam's objects with arguments that work for the device:

- :func:`wrap_ddp`: the seam's ``create_ddp_model`` with the local GPU as ``device_ids`` for a CUDA
  model and none for a CPU model (gloo); a model with nothing to train (evaluation of a frozen
  pipeline) is not wrapped, as DDP refuses it.
- :func:`build_trainer`: ``SimpleTrainer``; with AMP, ``AMPTrainer`` (float16 autocast + GradScaler)
  on CUDA, and on CPU ``SimpleTrainer`` with the model's forward (and so its losses) in bfloat16
  autocast: float16 on CPU is slow, and bfloat16 has float32's exponent range, so the loss needs no
  scaling. Weights, gradients and the optimizer stay in float32.
- :func:`write_run_files`: ``env.txt`` and ``command.txt`` in the output folder, which Detectron2's
  ``default_setup`` only logs.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .d2 import AMPTrainer, SimpleTrainer, collect_env_info, comm, create_ddp_model
from .utils.io import atomic_path

__all__ = ["build_trainer", "wrap_ddp", "write_run_files"]

logger = logging.getLogger(__name__)


def _on_cuda(model: nn.Module) -> bool:
    return any(p.device.type == "cuda" for p in model.parameters())


def wrap_ddp(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``create_ddp_model(model, **kwargs)`` (the seam's), with ``device_ids`` that fit the model's device.

    Args:
        model: the model, already on its device.
        kwargs: options of ``create_ddp_model`` (``fp16_compression``, ``broadcast_buffers``, ...);
            an explicit ``device_ids`` is passed on unchanged.
    Returns:
        ``model`` itself in a single process or when no parameter requires a gradient; otherwise the
        ``DistributedDataParallel`` wrapper.
    """
    if comm.get_world_size() == 1:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        logger.info("The model has no trainable parameter: it is not wrapped in DistributedDataParallel.")
        return model
    if "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()] if _on_cuda(model) else None
    return create_ddp_model(model, **kwargs)


class _CpuAutocast(nn.Module):
    """Runs ``model``'s forward, losses included, in bfloat16 CPU autocast (backward runs outside it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def build_trainer(
    model: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer, *, amp: bool
) -> SimpleTrainer:
    """The trainer of ``train.amp.enabled=amp`` for ``model``'s device (see the module docstring).

    The trainer's ``state_dict`` holds what the chosen trainer saves (optimizer; GradScaler on CUDA).
    Checkpoint ``model`` itself, not ``trainer.model`` (on CPU with AMP that is the autocast wrapper).
    """
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    if _on_cuda(model):
        return AMPTrainer(model, data_loader, optimizer)
    logger.info("Mixed precision on CPU: forward in bfloat16 autocast, no loss scaling.")
    return SimpleTrainer(_CpuAutocast(model), data_loader, optimizer)


def write_run_files(output_dir: str, args: argparse.Namespace) -> None:
    """Write ``env.txt`` (the backend's environment report) and ``command.txt`` (the command line and
    the parsed arguments) to ``output_dir``, on the main process only; each file atomically."""
    if not output_dir or not comm.is_main_process():
        return
    contents = {
        "env.txt": collect_env_info() + "\n",
        "command.txt": f"{shlex.join([sys.executable, *sys.argv])}\n# args: {args}\n",
    }
    for name, text in contents.items():
        with atomic_path(os.path.join(output_dir, name)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
