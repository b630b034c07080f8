"""Shims for third-party packages that lag behind today's stack, each scoped to where it is needed."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

__all__ = ["numpy_float_alias"]


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """Provide ``np.float`` inside the block, then remove it again.

    lvis 0.5.3 (the latest release) calls ``np.float`` in ``LVISEval.accumulate``; NumPy 1.24
    removed that alias of the builtin ``float``. Only added when missing; nested blocks are fine.
    """
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]
