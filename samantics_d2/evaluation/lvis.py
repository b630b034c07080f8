"""``LVISEvaluator`` that runs on NumPy >= 1.24 with either backend."""
from __future__ import annotations

from typing import Any

from ..d2 import LVISEvaluator as _BackendLVISEvaluator
from ..utils.compat import numpy_float_alias

__all__ = ["LVISEvaluator"]


class LVISEvaluator(_BackendLVISEvaluator):
    """The seam's ``LVISEvaluator`` (Detectron2's or lite's), same arguments and results.

    Detectron2's evaluates with the ``lvis`` package, whose latest release calls ``np.float``
    (removed in NumPy 1.24): ``evaluate`` provides that alias while it runs, and only then.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with numpy_float_alias():
            return super().evaluate(*args, **kwargs)
