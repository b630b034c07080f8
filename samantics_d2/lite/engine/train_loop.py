"""The training loop: ``HookBase``, ``TrainerBase``, ``SimpleTrainer``, ``AMPTrainer``.

Same contract as ``detectron2.engine.train_loop``: ``train(start_iter, max_iter)`` runs, inside an
:class:`EventStorage`, ``before_train``, then for each iteration ``before_step``, ``run_step``,
``after_step``, and finally ``after_train`` (also after an exception). Hooks do everything
else (LR schedule, checkpoints, evaluation, logging).
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .. import comm
from ..events import EventStorage, get_event_storage

__all__ = ["AMPTrainer", "HookBase", "SimpleTrainer", "TrainerBase"]

logger = logging.getLogger(__name__)


class HookBase:
    """A hook called by the trainer at fixed points of training.

    ``self.trainer`` is a weak proxy to the trainer, set by ``TrainerBase.register_hooks``.
    Hooks with state (e.g. a scheduler) return it from ``state_dict``; it is saved with the
    trainer's checkpoint and given back through ``load_state_dict`` on resume.
    """

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class TrainerBase:
    """Iterates from ``start_iter`` to ``max_iter - 1`` calling ``run_step`` and the hooks.

    Attributes: ``iter`` (the current iteration; ``max_iter`` after a completed training),
    ``start_iter``, ``max_iter``, ``storage`` (the :class:`EventStorage` of the run).
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        """Append hooks, called in this order; ``None`` entries are ignored (e.g. main-process-only hooks)."""
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"register_hooks got a {type(h).__name__}; hooks must subclass HookBase.")
            # A weak proxy: the trainer holds its hooks, a hook must not keep its trainer alive.
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``."""
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                # iter == max_iter tells after_train that training completed (no exception).
                self.iter += 1
            except Exception:
                logger.exception("Exception during training:")
                raise
            finally:
                self.after_train()

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.after_train()

    def before_step(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.before_step()

    def after_backward(self) -> None:
        for h in self._hooks:
            h.after_backward()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()

    def run_step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"iteration": iter, "hooks": {hook class name: hook state}}`` (hooks with state only)."""
        state: dict[str, Any] = {"iteration": self.iter}
        hooks_state: dict[str, Any] = {}
        for h in self._hooks:
            hook_state = h.state_dict()
            if hook_state:
                name = type(h).__qualname__
                if name in hooks_state:
                    logger.warning("Two hooks of type %s have state; only the first one's is saved.", name)
                    continue
                hooks_state[name] = hook_state
        if hooks_state:
            state["hooks"] = hooks_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.iter = int(state_dict["iteration"])
        for name, hook_state in state_dict.get("hooks", {}).items():
            matching = [h for h in self._hooks if type(h).__qualname__ == name]
            if not matching:
                logger.warning("The checkpoint has state for hook %r, which is not registered: ignored.", name)
            for h in matching:
                h.load_state_dict(hook_state)


class SimpleTrainer(TrainerBase):
    """One optimizer step per iteration on a model that returns a dict of losses.

    ``run_step``: next batch from ``data_loader``; ``loss_dict = model(batch)`` (a dict of scalar
    tensors, or one scalar tensor, recorded as ``total_loss``); sum; zero_grad; backward; record
    ``data_time``, the losses (averaged over processes) and ``total_loss``; ``optimizer.step()``.
    A non-finite total loss raises FloatingPointError before the optimizer step.

    Args:
        model: in training mode; returns the loss dict.
        data_loader: an iterable of batches; iterated endlessly by the trainer.
        optimizer: a torch optimizer.
        gather_metric_period: record metrics every this many iterations (gathering them across
            processes costs a synchronization).
        zero_grad_before_forward: zero the gradients before the forward pass instead of after it.
        async_write_metrics: record the metrics in a background thread (the step does not wait for
            the gather); all are recorded before ``after_train`` returns.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
    ) -> None:
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter_obj: Optional[Iterator[Any]] = None
        self.optimizer = optimizer
        self.gather_metric_period = gather_metric_period
        self.zero_grad_before_forward = zero_grad_before_forward
        self.async_write_metrics = async_write_metrics
        self.concurrent_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    @property
    def _data_loader_iter(self) -> Iterator[Any]:
        # Created on first use, so that building the trainer does not start data-loading workers.
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def reset_data_loader(self, data_loader_builder: Callable[[], Iterable[Any]]) -> None:
        """Replace the data loader by ``data_loader_builder()`` (the old one is dropped first, so its
        workers can exit before the new one starts its own)."""
        del self.data_loader
        self._data_loader_iter_obj = None
        self.data_loader = data_loader_builder()

    def after_train(self) -> None:
        super().after_train()
        # Metrics still being written in the background are recorded before training returns.
        self.concurrent_executor.shutdown(wait=True)
        self.concurrent_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _next_batch(self) -> tuple[Any, float]:
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        return data, time.perf_counter() - start

    @staticmethod
    def _sum_losses(loss_dict: Union[Mapping[str, torch.Tensor], torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if isinstance(loss_dict, torch.Tensor):
            return {"total_loss": loss_dict}, loss_dict
        if not isinstance(loss_dict, Mapping) or not loss_dict:
            raise TypeError(
                f"In training mode the model must return a non-empty dict of scalar loss tensors, got {loss_dict!r}."
            )
        return dict(loss_dict), sum(loss_dict.values())

    def run_step(self) -> None:
        if not self.model.training:
            raise RuntimeError(f"[SimpleTrainer] the model was put in eval mode at iteration {self.iter}; call model.train().")
        data, data_time = self._next_batch()
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        loss_dict, losses = self._sum_losses(self.model(data))
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float, prefix: str = "") -> None:
        if (self.iter + 1) % self.gather_metric_period != 0:
            return
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics_logged, loss_dict, data_time, self.iter, prefix)
        else:
            self.write_metrics(loss_dict, data_time, self.iter, prefix)

    def _write_metrics_logged(
        self, loss_dict: Mapping[str, torch.Tensor], data_time: float, cur_iter: int, prefix: str
    ) -> None:
        try:
            self.write_metrics(loss_dict, data_time, cur_iter, prefix)
        except Exception:  # a background thread's exception would otherwise go unseen
            logger.exception("Exception in writing metrics of iteration %d:", cur_iter)
            raise

    @staticmethod
    def write_metrics(loss_dict: Mapping[str, torch.Tensor], data_time: float, cur_iter: int, prefix: str = "") -> None:
        """Record ``data_time`` (max over processes), each loss and ``total_loss`` (mean over processes).

        All processes must call it (it gathers); only the main process records. Raises
        FloatingPointError when the total loss is NaN or infinite.
        """
        metrics = {k: v.detach().cpu().item() for k, v in loss_dict.items()}
        metrics["data_time"] = data_time
        all_metrics = comm.gather(metrics)
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.put_scalar("data_time", max(m.pop("data_time") for m in all_metrics), cur_iter=cur_iter)
        mean_metrics = {k: float(np.mean([m[k] for m in all_metrics])) for k in all_metrics[0]}
        total_loss = sum(mean_metrics.values())
        if not np.isfinite(total_loss):
            raise FloatingPointError(f"Loss became infinite or NaN at iteration={cur_iter}!\nloss_dict = {mean_metrics}")
        storage.put_scalar(f"{prefix}total_loss", total_loss, cur_iter=cur_iter)
        if len(mean_metrics) > 1:
            storage.put_scalars(cur_iter=cur_iter, **mean_metrics)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])


class AMPTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` with CUDA automatic mixed precision, as Detectron2's.

    The forward pass and the losses run in ``torch.autocast("cuda", precision)`` (float16 by
    default); a ``torch.amp.GradScaler`` (``grad_scaler``, default a new one) scales the loss before
    backward and unscales before the optimizer step; its state is saved with the trainer. CUDA is
    required: ``run_step`` raises AssertionError without it, as Detectron2 does (``train_net.py``
    chooses a bfloat16 CPU trainer itself: :func:`samantics_d2.engine.build_trainer`).
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        precision: torch.dtype = torch.float16,
        log_grad_scaler: bool = False,
        async_write_metrics: bool = False,
    ) -> None:
        if isinstance(model, DataParallel) or (
            isinstance(model, DistributedDataParallel) and model.device_ids and len(model.device_ids) > 1
        ):
            raise ValueError("AMPTrainer does not support single-process multi-device models: use one device per process.")
        super().__init__(
            model, data_loader, optimizer, gather_metric_period, zero_grad_before_forward, async_write_metrics
        )
        self.grad_scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler("cuda")
        self.precision = precision
        self.log_grad_scaler = log_grad_scaler

    def run_step(self) -> None:
        if not self.model.training:
            raise RuntimeError(f"[AMPTrainer] the model was put in eval mode at iteration {self.iter}; call model.train().")
        if not torch.cuda.is_available():
            raise AssertionError(
                "[AMPTrainer] CUDA is required for AMP training! (On CPU, samantics_d2.engine.build_trainer(..., "
                "amp=True) trains with a bfloat16 autocast forward instead.)"
            )
        data, data_time = self._next_batch()
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type="cuda", dtype=self.precision):
            loss_dict, losses = self._sum_losses(self.model(data))
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if self.log_grad_scaler:
            self.storage.put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
