"""Atomic file writes and the project's cache folder."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator

__all__ = ["CACHE_ENV", "atomic_path", "cache_root"]

CACHE_ENV = "SAMANTICS_CACHE"


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    An interrupted writer leaves either the old file or the new one, never half a file; the
    temporary file is removed when the block raises.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A unique name the writer creates itself, so the file gets the usual permissions (umask).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cache_root() -> str:
    """``$SAMANTICS_CACHE``, default ``~/.cache/samantics_d2``: generated datasets, feature caches, memory banks."""
    return os.path.expanduser(os.environ.get(CACHE_ENV, os.path.join("~", ".cache", "samantics_d2")))
