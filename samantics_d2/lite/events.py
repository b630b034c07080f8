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
from functools import cached_property
from typing import Any, Callable, Iterator, Optional

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
    "has_event_storage",
]

logger = logging.getLogger(__name__)

_CURRENT_STORAGE_STACK: list["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The innermost active :class:`EventStorage`; AssertionError (as Detectron2) outside any ``with EventStorage()``."""
    if not _CURRENT_STORAGE_STACK:
        raise AssertionError(
            "get_event_storage() was called outside an EventStorage: call it inside "
            "'with EventStorage(...):' (the trainer opens one around training)."
        )
    return _CURRENT_STORAGE_STACK[-1]


def has_event_storage() -> bool:
    """Whether some ``with EventStorage(...)`` block is active."""
    return len(_CURRENT_STORAGE_STACK) > 0


class EventStorage:
    """Scalar metrics of a training run, indexed by iteration.

    Use as a context manager: ``with EventStorage(start_iter) as storage: ...``. ``iter`` is the
    iteration the next ``put_scalar`` is recorded at; the trainer sets it before each step.
    Images (``put_image``) and histograms (``put_histogram``) are kept until a
    :class:`TensorboardXWriter` writes and clears them.
    """

    def __init__(self, start_iter: int = 0) -> None:
        self._history: defaultdict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[float, int]] = {}
        self._iter = int(start_iter)
        self._current_prefix = ""
        self._vis_data: list[tuple[str, Any, int]] = []
        self._histograms: list[dict[str, Any]] = []

    def put_image(self, img_name: str, img_tensor: Any) -> None:
        """Keep ``img_tensor`` (``[3, H, W]`` RGB, float in [0, 1] or uint8) for TensorBoard, at ``iter``."""
        self._vis_data.append((img_name, img_tensor, self._iter))

    def put_histogram(self, hist_name: str, hist_tensor: torch.Tensor, bins: int = 1000) -> None:
        """Keep a ``bins``-bin histogram of the values of ``hist_tensor`` for TensorBoard, at ``iter``."""
        low, high = hist_tensor.min().item(), hist_tensor.max().item()
        counts = torch.histc(hist_tensor, bins=bins)
        edges = torch.linspace(start=low, end=high, steps=bins + 1, dtype=torch.float32)
        self._histograms.append(
            dict(
                tag=hist_name,
                min=low,
                max=high,
                num=len(hist_tensor),
                sum=float(hist_tensor.sum()),
                sum_squares=float(torch.sum(hist_tensor**2)),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=self._iter,
            )
        )

    def clear_images(self) -> None:
        """Drop the kept images (the writer that wrote them calls this)."""
        self._vis_data = []

    def clear_histograms(self) -> None:
        """Drop the kept histograms (the writer that wrote them calls this)."""
        self._histograms = []

    def put_scalar(self, name: str, value: Any, smoothing_hint: bool = True, *, cur_iter: Optional[int] = None) -> None:
        """Record ``value`` (anything ``float()`` accepts) for ``name`` at ``cur_iter`` (default: ``iter``).

        ``smoothing_hint`` tells writers whether to report a windowed median (True) or the latest
        value (False); it must be the same every time a name is recorded.
        """
        name = self._current_prefix + name
        cur_iter = self._iter if cur_iter is None else int(cur_iter)
        value = float(value)
        existing = self._smoothing_hints.setdefault(name, smoothing_hint)
        if existing != smoothing_hint:  # AssertionError, as Detectron2
            raise AssertionError(
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
        """Like :meth:`latest`, but for smoothed scalars the median of the values recorded in the last
        ``window_size`` iterations (a window of iterations, not of values: see :meth:`count_samples`)."""
        return {
            name: (
                self._history[name].median(self.count_samples(name, window_size))
                if self._smoothing_hints[name]
                else value,
                itr,
            )
            for name, (value, itr) in self._latest_scalars.items()
        }

    def count_samples(self, name: str, window_size: int = 20) -> int:
        """How many values of ``name`` were recorded in the ``window_size`` iterations ending at its latest one."""
        values = self.history(name).values()
        last_iter = values[-1][1]
        count = 0
        for _, itr in reversed(values):
            if itr <= last_iter - window_size:
                break
            count += 1
        return count

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
    """Writes the scalars, images and histograms to TensorBoard event files in ``log_dir``.

    The ``torch.utils.tensorboard.SummaryWriter`` (given ``kwargs``) is created at the first write,
    so a writer that never writes leaves no file behind.
    """

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs: Any) -> None:
        self._window_size = window_size
        self._writer_args = {"log_dir": log_dir, **kwargs}
        self._last_write = -1

    @cached_property
    def _writer(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"TensorboardXWriter({self._writer_args['log_dir']!r}) needs the 'tensorboard' package ({e}); "
                "install it with 'pip install tensorboard', or leave TensorboardXWriter out of the writers."
            ) from e
        return SummaryWriter(**self._writer_args)

    def write(self) -> None:
        storage = get_event_storage()
        new_last_write = self._last_write
        for name, (value, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:
                self._writer.add_scalar(name, value, itr)
                new_last_write = max(new_last_write, itr)
        self._last_write = new_last_write
        # Images and histograms are kept by the storage only for this writer, which clears them.
        if storage._vis_data:
            for img_name, img, step in storage._vis_data:
                self._writer.add_image(img_name, img, step)
            storage.clear_images()
        if storage._histograms:
            for params in storage._histograms:
                self._writer.add_histogram_raw(**params)
            storage.clear_histograms()

    def close(self) -> None:
        if "_writer" in self.__dict__:
            self._writer.close()


class CommonMetricPrinter(EventWriter):
    """Logs one line per write: ETA, iteration, losses, ``[metric]`` scalars, time, data_time, lr,
    max_mem (CUDA only).

    Losses and ``[metric]`` scalars are medians over the last ``window_size`` iterations; ``time``
    is the average step time of the whole run (``hooks.IterationTimer`` records it) and
    ``data_time`` the average over the window, each followed by its latest value. The ETA uses the
    median step ``time`` and ``max_iter``; without ``time`` it is estimated from the wall clock
    between writes. Lines go to the logger ``detectron2.utils.events`` (``self.logger``), as in
    Detectron2, so that ``setup_logger()`` (name ``"detectron2"``) shows training progress.
    """

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20) -> None:
        self.logger = logging.getLogger("detectron2.utils.events")
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

        def windowed_median(name: str) -> float:
            return histories[name].median(storage.count_samples(name, self._window_size))

        def field(label: str, name: str, value: Callable[[HistoryBuffer], float], fmt: str) -> Optional[str]:
            return f"{label}: {value(histories[name]):{fmt}}" if name in histories else None

        eta = self._eta(storage)
        fields = [f"eta: {eta}" if eta else None, f"iter: {iteration}"]
        fields += [f"{k}: {windowed_median(k):.4g}" for k in histories if "loss" in k]
        fields += [f"{k}: {windowed_median(k):.4g}" for k in histories if "[metric]" in k]
        fields += [
            field("time", "time", HistoryBuffer.global_avg, ".4f"),
            field("last_time", "time", HistoryBuffer.latest, ".4f"),
            field("data_time", "data_time", lambda h: h.avg(storage.count_samples("data_time", self._window_size)), ".4f"),
            field("last_data_time", "data_time", HistoryBuffer.latest, ".4f"),
            field("lr", "lr", HistoryBuffer.latest, ".5g") or "lr: N/A",
        ]
        if torch.cuda.is_available():
            fields.append(f"max_mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}M")
        self.logger.info(" ".join(f for f in fields if f))
