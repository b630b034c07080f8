"""The one preparation step of a model's reference features, and its guard against stale features.

Reference features (TrainingFreeSegmenter's prototypes, RefSAM's reference tokens) depend on the
weights of one part of the model (the semantic encoder, the frozen SAM), loaded after the config is
built. So a model never prepares them in ``forward``: :func:`prepare_references` runs its
``prepare_references()`` once, after building and loading (``train_net.py`` before evaluating, the
tools before the first image, ``DefaultPredictor`` users on ``predictor.model``).

The guard: :func:`watch_weight_loads` puts a load-state-dict pre-hook on the part the features
depend on that counts the loads holding any of its keys (``DetectionCheckpointer``,
``load_state_dict``, into the model or into the part itself); the model records the count when it
prepares (:func:`weight_loads`) and reads its features through :func:`check_prepared`, which raises
a ``RuntimeError`` naming the preparation step when they were never prepared or the weights were
loaded since. The count lives on the watched module itself, so deep copies keep their own prepared
features and whole-model pickles work.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, TypeVar

__all__ = ["check_prepared", "prepare_references", "watch_weight_loads", "weight_loads"]

T = TypeVar("T")

_COUNT = "_samantics_weight_loads"


def prepare_references(model: Any) -> None:
    """Compute (or load) the reference features of ``model`` (unwrapped from DDP) when it has
    ``prepare_references``: call it after the weights are loaded and before the model runs."""
    model = getattr(model, "module", model)
    prepare = getattr(model, "prepare_references", None)
    if callable(prepare):
        prepare()


def _count_weight_loads(module: Any, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: counts the loads that hold any key of ``module``. A plain function
    on the module's own state: copies and pickles of the model keep working."""
    if any(key.startswith(prefix) for key in state_dict):
        setattr(module, _COUNT, weight_loads(module) + 1)


def watch_weight_loads(module: Any) -> None:
    """Count the weight loads into ``module`` (an ``nn.Module``: the part reference features depend on)."""
    module.register_load_state_dict_pre_hook(_count_weight_loads)


def weight_loads(module: Optional[Any]) -> int:
    """How many times weights were loaded into ``module`` (0: never, or not watched)."""
    return getattr(module, _COUNT, 0)


def check_prepared(prepared: Optional[T], *, model: str, weights: str, module: Optional[Any],
                   loads_when_prepared: int) -> T:
    """``prepared`` (a model's reference features) when they were prepared and ``module``'s weights
    were not loaded since (``loads_when_prepared``: :func:`weight_loads` when they were); else a
    ``RuntimeError`` naming the step. ``model``: the class name, ``weights``: whose weights (for
    the message)."""
    if prepared is None or weight_loads(module) != loads_when_prepared:
        raise RuntimeError(
            f"{model}: the reference features are not prepared (never, or the {weights} weights were loaded since). "
            "Call samantics_d2.references.prepare_references(model) (or model.prepare_references()) after building "
            "the model and loading its weights, before the first image; with Detectron2's DefaultPredictor: "
            "prepare_references(predictor.model)."
        )
    return prepared
