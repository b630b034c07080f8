"""``DatasetEvaluator``, ``DatasetEvaluators`` and ``inference_on_dataset``, as in ``detectron2.evaluation``."""
from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .. import comm

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_context", "inference_on_dataset"]

logger = logging.getLogger(__name__)

_CALLBACK_NAMES = ("on_start", "before_inference", "after_inference", "on_end")


class DatasetEvaluator:
    """Accumulates a model's outputs over a dataset, then computes metrics.

    ``reset()`` before a pass, ``process(inputs, outputs)`` after each batch, ``evaluate()`` at the
    end. With several processes each one sees its share of the data; ``evaluate`` gathers them and
    returns the results on the main process (other processes may return ``{}`` or ``None``).
    """

    def reset(self) -> None:
        """Forget everything processed so far."""

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Take one batch: the model's ``inputs`` (dataset dicts) and its ``outputs``, pairwise."""

    def evaluate(self) -> Optional[dict[str, Any]]:
        """Results as ``{task: {metric: value}}`` (or ``{metric: value}``)."""


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run as one; their result dicts are merged (keys must not collide)."""

    def __init__(self, evaluators: list[DatasetEvaluator]):
        super().__init__()
        self._evaluators = evaluators

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> OrderedDict:
        results: OrderedDict = OrderedDict()
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if comm.is_main_process() and result is not None:
                for k, v in result.items():
                    if k in results:
                        raise KeyError(
                            f"Two evaluators produce results under the same key {k!r} "
                            f"({type(evaluator).__name__} is the second); give them distinct tasks."
                        )
                    results[k] = v
        return results


@contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then restore its previous training mode."""
    training_mode = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training_mode)


def inference_on_dataset(
    model: Union[nn.Module, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]],
    data_loader: Iterable[list[dict[str, Any]]],
    evaluator: Union[DatasetEvaluator, list[DatasetEvaluator], None],
    callbacks: Optional[dict[str, Callable[[], None]]] = None,
) -> dict[str, Any]:
    """Run ``model`` on every batch of ``data_loader`` and evaluate its outputs.

    The model runs in eval mode (its mode is restored afterwards) under ``torch.no_grad``. Progress
    with an ETA is logged every 5 s; the total and per-image times at the end (the first few
    batches are warm-up and are not counted in the per-image time).

    Args:
        model: called as ``model(inputs)`` on each batch (a list of dataset dicts).
        data_loader: an iterable of batches, with ``len``.
        evaluator: one evaluator, a list of them, or None to only run the model.
        callbacks: optional functions without arguments under the keys ``on_start``,
            ``before_inference``, ``after_inference`` and ``on_end``.
    Returns:
        The evaluators' results on the main process, ``{}`` on the others.
    """
    callbacks = dict(callbacks or {})
    unknown = set(callbacks) - set(_CALLBACK_NAMES)
    if unknown:
        raise ValueError(
            f"inference_on_dataset: unknown callbacks {sorted(unknown)}; valid keys are {_CALLBACK_NAMES}."
        )

    def run_callback(name: str) -> None:
        if name in callbacks:
            callbacks[name]()

    num_devices = comm.get_world_size()
    total = len(data_loader)  # type: ignore[arg-type]
    logger.info("Start inference on %d batches", total)
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif isinstance(evaluator, (list, tuple)):
        evaluator = DatasetEvaluators(list(evaluator))
    evaluator.reset()

    num_warmup = min(5, total - 1)
    start_time = time.perf_counter()
    total_data_time = total_compute_time = total_eval_time = 0.0
    last_log_time = start_time
    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())

        start_data_time = time.perf_counter()
        run_callback("on_start")
        for idx, inputs in enumerate(data_loader):
            total_data_time += time.perf_counter() - start_data_time
            if idx == num_warmup:
                start_time = time.perf_counter()
                total_data_time = total_compute_time = total_eval_time = 0.0

            start_compute_time = time.perf_counter()
            run_callback("before_inference")
            outputs = model(inputs)
            run_callback("after_inference")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            total_compute_time += time.perf_counter() - start_compute_time

            start_eval_time = time.perf_counter()
            evaluator.process(inputs, outputs)
            total_eval_time += time.perf_counter() - start_eval_time

            now = time.perf_counter()
            iters_after_start = idx + 1 - num_warmup * int(idx >= num_warmup)
            compute_seconds_per_iter = total_compute_time / iters_after_start
            if (idx >= num_warmup * 2 or compute_seconds_per_iter > 5) and now - last_log_time >= 5:
                last_log_time = now
                total_seconds_per_iter = (now - start_time) / iters_after_start
                eta = datetime.timedelta(seconds=int(total_seconds_per_iter * (total - idx - 1)))
                logger.info(
                    "Inference done %d/%d. Dataloading: %.4f s/iter. Inference: %.4f s/iter. "
                    "Eval: %.4f s/iter. Total: %.4f s/iter. ETA=%s",
                    idx + 1,
                    total,
                    total_data_time / iters_after_start,
                    compute_seconds_per_iter,
                    total_eval_time / iters_after_start,
                    total_seconds_per_iter,
                    eta,
                )
            start_data_time = time.perf_counter()
        run_callback("on_end")

    total_time = time.perf_counter() - start_time
    counted = max(total - num_warmup, 1)
    logger.info(
        "Total inference time: %s (%.6f s / iter per device, on %d devices)",
        datetime.timedelta(seconds=int(total_time)),
        total_time / counted,
        num_devices,
    )
    logger.info(
        "Total inference pure compute time: %s (%.6f s / iter per device, on %d devices)",
        datetime.timedelta(seconds=int(total_compute_time)),
        total_compute_time / counted,
        num_devices,
    )
    results = evaluator.evaluate()
    # An evaluator may return None on non-main processes: give callers a dict either way.
    return {} if results is None else results
