"""Training metrics: ``EventStorage`` and its writers, as in ``detectron2.utils.events``.

The trainer opens an :class:`EventStorage`; code running inside it records scalars with
``get_event_storage().put_scalar(...)``; writers (console, ``metrics.json``, TensorBoard) read
the storage periodically. Histories are fvcore ``HistoryBuffer`` objects.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from fvcore.common.history_buffer import HistoryBuffer
from iopath.common.file_io import g_pathmgr

__all__ = [
    "CommonMetricPrinter",
    "EventStorage",
    "EventWriter",
    "JSONWriter",
    "TensorboardXWriter",
    "get_event_storage",
]

logger = logging.getLogger(__name__)

_CURRENT_STORAGE_STACK: list["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The innermost active :class:`EventStorage`; an error outside any ``with EventStorage()``."""
    if not _CURRENT_STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() was called outside an EventStorage: call it inside "
            "'with EventStorage(...):' (the trainer opens one around training)."
        )
    return _CURRENT_STORAGE_STACK[-1]


class EventStorage:
    """Scalar metrics of a training run, indexed by iteration.

    Use as a context manager: ``with EventStorage(start_iter) as storage: ...``. ``iter`` is the
    iteration the next ``put_scalar`` is recorded at; the trainer sets it before each step.
    """

    def __init__(self, start_iter: int = 0) -> None:
        self._history: defaultdict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[float, int]] = {}
        self._iter = int(start_iter)
        self._current_prefix = ""

    def put_scalar(self, name: str, value: Any, smoothing_hint: bool = True, *, cur_iter: Optional[int] = None) -> None:
        """Record ``value`` (anything ``float()`` accepts) for ``name`` at ``cur_iter`` (default: ``iter``).

        ``smoothing_hint`` tells writers whether to report a windowed median (True) or the latest
        value (False); it must be the same every time a name is recorded.
        """
        name = self._current_prefix + name
        cur_iter = self._iter if cur_iter is None else int(cur_iter)
        value = float(value)
        existing = self._smoothing_hints.setdefault(name, smoothing_hint)
        if existing != smoothing_hint:
            raise ValueError(
                f"Scalar {name!r} was recorded with smoothing_hint={existing} before and with "
                f"smoothing_hint={smoothing_hint} now: use one value per scalar name."
            )
        self._history[name].update(value, cur_iter)
        self._latest_scalars[name] = (value, cur_iter)

    def put_scalars(self, *, smoothing_hint: bool = True, cur_iter: Optional[int] = None, **kwargs: Any) -> None:
        """``put_scalar`` for each keyword argument: ``storage.put_scalars(loss=0.5, acc=0.9)``."""
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def history(self, name: str) -> HistoryBuffer:
        """The fvcore ``HistoryBuffer`` of ``name``; KeyError naming the recorded scalars if absent."""
        if name not in self._history:
            raise KeyError(f"No history for metric {name!r}; recorded metrics: {sorted(self._history)}")
        return self._history[name]

    def histories(self) -> dict[str, HistoryBuffer]:
        """All histories, by name."""
        return dict(self._history)

    def latest(self) -> dict[str, tuple[float, int]]:
        """``{name: (latest value, iteration it was recorded at)}``."""
        return dict(self._latest_scalars)

    def latest_with_smoothing_hint(self, window_size: int = 20) -> dict[str, tuple[float, int]]:
        """Like :meth:`latest`, but the median of the last ``window_size`` values for smoothed scalars."""
        return {
            name: (self._history[name].median(window_size) if self._smoothing_hints[name] else value, itr)
            for name, (value, itr) in self._latest_scalars.items()
        }

    def smoothing_hints(self) -> dict[str, bool]:
        return dict(self._smoothing_hints)

    def step(self) -> None:
        """Advance ``iter`` by one."""
        self._iter += 1

    @property
    def iter(self) -> int:
        return self._iter

    @iter.setter
    def iter(self, value: int) -> None:
        self._iter = int(value)

    @property
    def iteration(self) -> int:
        """Same as ``iter`` (older Detectron2 name)."""
        return self._iter

    @contextmanager
    def name_scope(self, name: str) -> Iterator[None]:
        """Prefix the scalars recorded inside the block with ``name/``."""
        old_prefix = self._current_prefix
        self._current_prefix = name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._current_prefix = old_prefix

    def __enter__(self) -> "EventStorage":
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert _CURRENT_STORAGE_STACK[-1] is self, "EventStorage contexts must be exited in order"
        _CURRENT_STORAGE_STACK.pop()


class EventWriter:
    """Reads the current :class:`EventStorage` and writes its content somewhere."""

    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JSONWriter(EventWriter):
    """Appends one JSON line per iteration with new scalars to ``json_file`` (e.g. ``metrics.json``).

    Each line is ``{"iteration": i, name: value, ...}``; smoothed scalars are the median of the
    last ``window_size`` values. Lines are flushed as they are written.
    """

    def __init__(self, json_file: str, window_size: int = 20) -> None:
        self._file_handle = g_pathmgr.open(json_file, "a")
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        by_iter: defaultdict[int, dict[str, float]] = defaultdict(dict)
        for name, (value, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:  # values of iterations already written are not repeated
                by_iter[itr][name] = value
        for itr in sorted(by_iter):
            self._file_handle.write(json.dumps({"iteration": itr, **by_iter[itr]}, sort_keys=True) + "\n")
        if by_iter:
            self._last_write = max(by_iter)
            self._file_handle.flush()

    def close(self) -> None:
        self._file_handle.close()


class TensorboardXWriter(EventWriter):
    """Writes the scalars to TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``)."""

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"TensorboardXWriter({log_dir!r}) needs the 'tensorboard' package ({e}); install it with "
                "'pip install tensorboard', or leave TensorboardXWriter out of the writers."
            ) from e
        self._window_size = window_size
        self._writer = SummaryWriter(log_dir, **kwargs)
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        new_last_write = self._last_write
        for name, (value, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:
                self._writer.add_scalar(name, value, itr)
                new_last_write = max(new_last_write, itr)
        self._last_write = new_last_write

    def close(self) -> None:
        self._writer.close()


class CommonMetricPrinter(EventWriter):
    """Logs one line per write: ETA, iteration, losses, time, data_time, lr, max_mem (CUDA only).

    The ETA uses the median step ``time`` (recorded by ``hooks.IterationTimer``) and ``max_iter``;
    without ``time`` it is estimated from the wall clock between writes.
    """

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20) -> None:
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write: Optional[tuple[int, float]] = None  # (iteration, time.perf_counter())

    def _eta(self, storage: EventStorage) -> Optional[str]:
        if self._max_iter is None:
            return None
        iteration = storage.iter
        remaining = self._max_iter - iteration - 1
        if "time" in storage.histories():
            eta_seconds = storage.history("time").median(1000) * remaining
            storage.put_scalar("eta_seconds", eta_seconds, smoothing_hint=False)
            return str(datetime.timedelta(seconds=int(eta_seconds)))
        eta = None
        now = time.perf_counter()
        if self._last_write is not None and iteration > self._last_write[0]:
            per_iter = (now - self._last_write[1]) / (iteration - self._last_write[0])
            eta = str(datetime.timedelta(seconds=int(per_iter * remaining)))
        self._last_write = (iteration, now)
        return eta

    def write(self) -> None:
        storage = get_event_storage()
        iteration = storage.iter
        if iteration == self._max_iter:
            # After training (PeriodicWriter.after_train): the last step was already printed.
            return
        histories = storage.histories()

        def median(name: str, fmt: str) -> Optional[str]:
            return format(histories[name].median(self._window_size), fmt) if name in histories else None

        def latest(name: str, fmt: str) -> Optional[str]:
            return format(histories[name].latest(), fmt) if name in histories else None

        eta = self._eta(storage)
        smoothed = storage.latest_with_smoothing_hint(self._window_size)
        losses = [f"{k}: {v:.4g}" for k, (v, itr) in smoothed.items() if "loss" in k and itr == iteration]
        fields = [f"eta: {eta}" if eta else None, f"iter: {iteration}", *losses]
        fields += [
            f"time: {t}" if (t := median("time", ".4f")) else None,
            f"last_time: {t}" if (t := latest("time", ".4f")) else None,
            f"data_time: {t}" if (t := median("data_time", ".4f")) else None,
            f"last_data_time: {t}" if (t := latest("data_time", ".4f")) else None,
            f"lr: {t}" if (t := latest("lr", ".5g")) else None,
        ]
        if torch.cuda.is_available():
            fields.append(f"max_mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}M")
        logger.info(" ".join(f for f in fields if f))
