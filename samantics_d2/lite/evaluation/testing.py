"""Result printing helpers, as in ``detectron2.evaluation.testing``."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tabulate import tabulate

__all__ = ["create_small_table", "flatten_results_dict", "print_csv_format"]

logger = logging.getLogger(__name__)


def print_csv_format(results: Mapping[str, Any]) -> None:
    """Log each task's metrics as two comma-separated lines (names, values) for copy-pasting.

    Per-category metrics (names with a ``-``, e.g. ``AP-person``) are left out.
    ``results`` is ``{task: {metric: value}}``; a non-dict value is logged as ``task=value``.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"print_csv_format expects a dict of results; got {type(results).__name__}: {results!r}.")
    for task, res in results.items():
        if isinstance(res, Mapping):
            important = [(k, v) for k, v in res.items() if "-" not in k]
            logger.info("copypaste: Task: %s", task)
            logger.info("copypaste: %s", ",".join(k for k, _ in important))
            logger.info("copypaste: %s", ",".join(f"{v:.4f}" for _, v in important))
        else:
            logger.info("copypaste: %s=%s", task, res)


def flatten_results_dict(results: Mapping[str, Any]) -> dict[str, Any]:
    """``{"bbox": {"AP": 1.0}}`` -> ``{"bbox/AP": 1.0}`` (nested dicts joined with ``/``)."""
    flat: dict[str, Any] = {}
    for k, v in results.items():
        if isinstance(v, Mapping):
            for kk, vv in flatten_results_dict(v).items():
                flat[f"{k}/{kk}"] = vv
        else:
            flat[k] = v
    return flat


def create_small_table(small_dict: Mapping[str, float]) -> str:
    """A one-row table: the keys as header, the values with 3 decimals."""
    return tabulate([list(small_dict.values())], headers=list(small_dict.keys()), tablefmt="pipe", floatfmt=".3f",
                    numalign="left")
