"""Training hooks with the names and behaviour of ``detectron2.engine.hooks``.

Usual order: ``IterationTimer``, ``LRScheduler``, ``PeriodicCheckpointer`` (main process),
``EvalHook``, ``PeriodicWriter`` (main process), so that a checkpoint holds the scheduler state
of the next iteration and the writers see this iteration's time, lr and evaluation results.
"""
from __future__ import annotations

import datetime
import logging
import math
import operator
import time
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from fvcore.common.checkpoint import Checkpointer
from fvcore.common.checkpoint import PeriodicCheckpointer as _PeriodicCheckpointer
from fvcore.common.param_scheduler import ParamScheduler
from fvcore.common.timer import Timer

from . import comm
from .engine.train_loop import HookBase
from .evaluation.testing import flatten_results_dict
from .events import EventWriter
from .solver import LRMultiplier

__all__ = [
    "BestCheckpointer",
    "CallbackHook",
    "EvalHook",
    "HookBase",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "PeriodicWriter",
]

logger = logging.getLogger(__name__)

_TrainerCallback = Optional[Callable[[Any], None]]


class CallbackHook(HookBase):
    """A hook made of functions, each called with the trainer."""

    def __init__(
        self,
        *,
        before_train: _TrainerCallback = None,
        after_train: _TrainerCallback = None,
        before_step: _TrainerCallback = None,
        after_step: _TrainerCallback = None,
    ) -> None:
        self._before_train = before_train
        self._after_train = after_train
        self._before_step = before_step
        self._after_step = after_step

    def before_train(self) -> None:
        if self._before_train:
            self._before_train(self.trainer)

    def after_train(self) -> None:
        if self._after_train:
            self._after_train(self.trainer)
        # The callbacks may be closures holding the trainer: release them.
        del self._before_train, self._after_train, self._before_step, self._after_step

    def before_step(self) -> None:
        if self._before_step:
            self._before_step(self.trainer)

    def after_step(self) -> None:
        if self._after_step:
            self._after_step(self.trainer)


class IterationTimer(HookBase):
    """Records the duration of each step as ``time`` and logs the training speed at the end.

    The first ``warmup_iter`` steps (slow: allocation, cudnn autotuning) are not counted; time
    spent in the hooks that come after this one is excluded from the step time.
    """

    def __init__(self, warmup_iter: int = 3) -> None:
        self._warmup_iter = warmup_iter
        self._step_timer = Timer()
        self._start_time = time.perf_counter()
        self._total_timer = Timer()

    def before_train(self) -> None:
        self._start_time = time.perf_counter()
        self._total_timer.reset()
        self._total_timer.pause()

    def after_train(self) -> None:
        total_time = time.perf_counter() - self._start_time
        time_in_steps = self._total_timer.seconds()
        num_iter = self.trainer.storage.iter + 1 - self.trainer.start_iter - self._warmup_iter
        if num_iter > 0 and time_in_steps > 0:
            logger.info(
                "Overall training speed: %d iterations in %s (%.4f s / it)",
                num_iter,
                datetime.timedelta(seconds=int(time_in_steps)),
                time_in_steps / num_iter,
            )
        logger.info(
            "Total training time: %s (%s on hooks)",
            datetime.timedelta(seconds=int(total_time)),
            datetime.timedelta(seconds=int(total_time - time_in_steps)),
        )

    def before_step(self) -> None:
        self._step_timer.reset()
        self._total_timer.resume()

    def after_step(self) -> None:
        iter_done = self.trainer.storage.iter - self.trainer.start_iter + 1
        if iter_done >= self._warmup_iter:
            self.trainer.storage.put_scalars(time=self._step_timer.seconds())
        else:
            self._start_time = time.perf_counter()
            self._total_timer.reset()
        self._total_timer.pause()


class LRScheduler(HookBase):
    """Steps an LR scheduler after every iteration and records the lr used as ``lr``.

    Args:
        optimizer: default: ``trainer.optimizer``.
        scheduler: a torch LR scheduler, or an fvcore ``ParamScheduler`` (a multiplier of the base
            lr as a function of progress) that is wrapped in :class:`LRMultiplier` over the
            trainer's ``max_iter``, starting at the trainer's current iteration (so a resumed run
            continues the schedule). Default: ``trainer.scheduler``.

    The recorded ``lr`` is that of the param group with the most parameters (or, when every group
    has one parameter, of the first group with the most common lr).
    """

    def __init__(
        self,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Union[torch.optim.lr_scheduler.LRScheduler, ParamScheduler, None] = None,
    ) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._summary_group = 0

    @property
    def scheduler(self) -> Union[torch.optim.lr_scheduler.LRScheduler, ParamScheduler]:
        return self._scheduler or self.trainer.scheduler

    def before_train(self) -> None:
        self._optimizer = self._optimizer or self.trainer.optimizer
        if isinstance(self.scheduler, ParamScheduler):
            self._scheduler = LRMultiplier(
                self._optimizer, self.scheduler, self.trainer.max_iter, last_iter=self.trainer.iter - 1
            )
        self._summary_group = self.summary_param_group(self._optimizer)

    @staticmethod
    def summary_param_group(optimizer: torch.optim.Optimizer) -> int:
        """Index of the param group whose lr is reported."""
        groups = optimizer.param_groups
        largest = max(len(g["params"]) for g in groups)
        if largest > 1:
            return next(i for i, g in enumerate(groups) if len(g["params"]) == largest)
        common_lr = Counter(g["lr"] for g in groups).most_common(1)[0][0]
        return next(i for i, g in enumerate(groups) if g["lr"] == common_lr)

    def after_step(self) -> None:
        lr = self._optimizer.param_groups[self._summary_group]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):
            return self.scheduler.state_dict()
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A ParamScheduler is stateless: before_train rebuilds its LRMultiplier at the trainer's
        # restored iteration. A torch scheduler given directly carries state, loaded here.
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):
            logger.info("Loading the LR scheduler state from the checkpoint")
            self.scheduler.load_state_dict(state_dict)


class PeriodicCheckpointer(_PeriodicCheckpointer, HookBase):
    """fvcore's ``PeriodicCheckpointer`` as a hook: saves ``{file_prefix}_{iter:07d}`` every
    ``period`` iterations and ``{file_prefix}_final`` after the last one (``max_iter`` is the
    trainer's). Register it on the main process only (other processes do not write anyway).
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        max_iter: Optional[int] = None,
        max_to_keep: Optional[int] = None,
        file_prefix: str = "model",
    ) -> None:
        if period <= 0:
            raise ValueError(f"PeriodicCheckpointer needs period > 0 (iterations between checkpoints), got {period}.")
        super().__init__(checkpointer, period, max_iter=max_iter, max_to_keep=max_to_keep, file_prefix=file_prefix)

    def before_train(self) -> None:
        self.max_iter = self.trainer.max_iter

    def after_step(self) -> None:
        self.step(self.trainer.iter)


class BestCheckpointer(HookBase):
    """Saves ``{file_prefix}.pth`` whenever the evaluation metric ``val_metric`` improves.

    Checks every ``eval_period`` iterations and after the last one; register it after the
    :class:`EvalHook` that records the metric (same period). ``mode``: ``"max"`` (higher is better)
    or ``"min"``. A NaN or infinite metric is never a best one.
    """

    def __init__(
        self,
        eval_period: int,
        checkpointer: Checkpointer,
        val_metric: str,
        mode: str = "max",
        file_prefix: str = "model_best",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"BestCheckpointer got mode={mode!r}; use 'max' (higher is better) or 'min'.")
        self._period = eval_period
        self._val_metric = val_metric
        self._compare = operator.gt if mode == "max" else operator.lt
        self._checkpointer = checkpointer
        self._file_prefix = file_prefix
        self.best_metric: Optional[float] = None
        self.best_iter: Optional[int] = None

    def _update_best(self, value: float, iteration: int) -> bool:
        if math.isnan(value) or math.isinf(value):
            return False
        self.best_metric, self.best_iter = value, iteration
        return True

    def _best_checking(self) -> None:
        latest = self.trainer.storage.latest().get(self._val_metric)
        if latest is None:
            logger.warning(
                "BestCheckpointer: metric %r has not been recorded (recorded: %s); no best checkpoint saved.",
                self._val_metric,
                sorted(self.trainer.storage.latest()),
            )
            return
        value, metric_iter = latest
        if self.best_metric is None or self._compare(value, self.best_metric):
            previous = self.best_metric
            if self._update_best(value, metric_iter):
                self._checkpointer.save(self._file_prefix, iteration=metric_iter)
                logger.info(
                    "Saved best model: %s = %.5f at iteration %d (previous best: %s)",
                    self._val_metric, value, metric_iter, "none" if previous is None else f"{previous:.5f}",
                )
        else:
            logger.info(
                "Not saving: %s = %.5f is not better than the best %.5f (iteration %d).",
                self._val_metric, value, self.best_metric, self.best_iter,
            )

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._best_checking()

    def after_train(self) -> None:
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._best_checking()


class EvalHook(HookBase):
    """Runs ``eval_function()`` every ``eval_period`` iterations and after training.

    ``eval_function`` returns a nested dict of numbers (e.g. ``{"bbox": {"AP": 40.1}}``), or
    nothing on processes other than the main one; the results are recorded as scalars named
    ``bbox/AP``. All processes must run the hook (evaluation is distributed); they synchronize
    after each evaluation. ``eval_period <= 0`` evaluates only after training.
    """

    def __init__(self, eval_period: int, eval_function: Callable[[], Optional[Mapping[str, Any]]], eval_after_train: bool = True) -> None:
        self._period = eval_period
        self._func = eval_function
        self._eval_after_train = eval_after_train

    def _do_eval(self) -> None:
        results = self._func()
        if results:
            if not isinstance(results, Mapping):
                raise TypeError(f"[EvalHook] eval_function must return a dict of results, got {type(results).__name__}: {results!r}")
            flat = flatten_results_dict(results)
            scalars: dict[str, float] = {}
            for key, value in flat.items():
                try:
                    scalars[key] = float(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"[EvalHook] eval_function must return a nested dict of numbers, got {key!r}: {value!r}."
                    ) from e
            self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)
        # Evaluation takes different times on different processes: wait for all before training on.
        comm.synchronize()

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            # The evaluation after the last iteration is done by after_train.
            self._do_eval()

    def after_train(self) -> None:
        # iter + 1 >= max_iter only when training completed; no evaluation after a failure.
        if self._eval_after_train and self.trainer.iter + 1 >= self.trainer.max_iter:
            self._do_eval()
        # The function may be a closure holding the trainer or model: release it.
        del self._func


class PeriodicWriter(HookBase):
    """Calls each writer's ``write()`` every ``period`` iterations, after the last one, and at the
    end of training (then ``close()``). Register it on the main process only."""

    def __init__(self, writers: Sequence[EventWriter], period: int = 20) -> None:
        for writer in writers:
            if not isinstance(writer, EventWriter):
                raise TypeError(f"PeriodicWriter got a {type(writer).__name__}; writers must subclass EventWriter.")
        self._writers = list(writers)
        self._period = period

    def after_step(self) -> None:
        if (self.trainer.iter + 1) % self._period == 0 or self.trainer.iter == self.trainer.max_iter - 1:
            for writer in self._writers:
                writer.write()

    def after_train(self) -> None:
        for writer in self._writers:
            # Write what came after the last periodic write (e.g. the final evaluation), then close.
            writer.write()
            writer.close()
