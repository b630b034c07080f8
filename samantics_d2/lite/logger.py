"""``setup_logger`` with the behaviour of ``detectron2.utils.logger.setup_logger``.

Rank 0 logs to the console (coloured unless ``color=False``); every rank logs to a file when an
output is given: ``<output>/log.txt`` on rank 0, ``<output>/log.txt.rank<r>`` on rank ``r``.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import IO, Optional

from iopath.common.file_io import g_pathmgr
from termcolor import colored

__all__ = ["setup_logger"]

_PLAIN_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"

# One logger configuration per set of arguments, so repeated calls never
# stack handlers; one open stream per log file, shared by the loggers writing to it.
_configured: dict[tuple, logging.Logger] = {}
_streams: dict[str, IO[str]] = {}


class _ColorfulFormatter(logging.Formatter):
    """Abbreviates the root logger name and marks warnings and errors in colour."""

    def __init__(self, fmt: str, *, datefmt: str, root_name: str, abbrev_name: str) -> None:
        super().__init__(fmt, datefmt=datefmt)
        self._root_name = root_name + "."
        self._abbrev_name = abbrev_name + "." if abbrev_name else ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        full_name = record.name
        record.name = full_name.replace(self._root_name, self._abbrev_name)
        try:
            message = super().formatMessage(record)
        finally:
            record.name = full_name  # other handlers (the log file) keep the full name
        if record.levelno == logging.WARNING:
            return colored("WARNING", "red", attrs=["blink"]) + " " + message
        if record.levelno >= logging.ERROR:
            return colored("ERROR", "red", attrs=["blink", "underline"]) + " " + message
        return message


def _log_stream(filename: str) -> IO[str]:
    """An append-mode stream to ``filename``, opened once per process and closed at exit."""
    if filename not in _streams:
        stream = g_pathmgr.open(filename, "a", buffering=1)  # line-buffered: a crash loses nothing
        atexit.register(stream.close)
        _streams[filename] = stream
    return _streams[filename]


def setup_logger(
    output: Optional[str] = None,
    distributed_rank: int = 0,
    *,
    color: bool = True,
    name: str = "detectron2",
    abbrev_name: Optional[str] = None,
    enable_propagation: bool = False,
    configure_stdout: bool = True,
) -> logging.Logger:
    """Configure the logger ``name`` (level DEBUG) and return it.

    Args:
        output: a file name ending in ``.txt`` or ``.log``, or a directory (logs go to
            ``<output>/log.txt``); ``None`` logs to the console only. Ranks > 0 append
            ``.rank<r>`` to the file name.
        distributed_rank: this process's rank; only rank 0 logs to the console.
        color: colour the console output.
        name: the logger to configure; its children (``name.xxx``) log through it.
        abbrev_name: how ``name`` is abbreviated in console lines (``"d2"`` for ``"detectron2"``).
        enable_propagation: also pass the records on to the parent loggers' handlers.
        configure_stdout: log to the console (on rank 0); False: only to the file.

    Calling again with the same arguments returns the same logger without adding handlers.
    """
    key = (output, int(distributed_rank), name, bool(color), abbrev_name, enable_propagation, configure_stdout)
    if key in _configured:
        return _configured[key]
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = enable_propagation
    if abbrev_name is None:
        abbrev_name = "d2" if name == "detectron2" else name
    plain_formatter = logging.Formatter(_PLAIN_FORMAT, datefmt=_DATE_FORMAT)

    if configure_stdout and distributed_rank == 0:
        console = logging.StreamHandler(stream=sys.stdout)
        console.setLevel(logging.DEBUG)
        if color:
            console.setFormatter(
                _ColorfulFormatter(
                    colored("[%(asctime)s %(name)s]: ", "green") + "%(message)s",
                    datefmt=_DATE_FORMAT,
                    root_name=name,
                    abbrev_name=str(abbrev_name),
                )
            )
        else:
            console.setFormatter(plain_formatter)
        logger.addHandler(console)

    if output is not None:
        filename = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        directory = os.path.dirname(filename)
        if directory:
            g_pathmgr.mkdirs(directory)
        file_handler = logging.StreamHandler(_log_stream(filename))
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(plain_formatter)
        logger.addHandler(file_handler)

    _configured[key] = logger
    return logger
