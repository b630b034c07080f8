"""Argument checks that report every problem at once, and the one reading of a ``loss_weight``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence, Union

__all__ = ["LossWeight", "loss_weights", "raise_if_problems"]

LossWeight = Union[float, Mapping[str, float]]


def raise_if_problems(owner: str, problems: Sequence[str]) -> None:
    """``ValueError("<owner>: <problem>; <problem>.")`` when ``problems`` is not empty.

    Constructors collect what is wrong with their arguments into ``problems`` (each naming the
    value received and what was expected) so that one error lists them all.
    """
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems) + ".")


def loss_weights(owner: str, defaults: Mapping[str, float], loss_weight: LossWeight) -> dict[str, float]:
    """The weight of each loss of ``owner``, keyed by the loss names its training step returns.

    ``loss_weight`` is read as Detectron2's ``FastRCNNOutputLayers`` reads its argument of that name: a
    number weighs every loss alike; a mapping ``{loss name: weight}`` sets those losses. Unlike
    Detectron2 (which gives a loss left out of the mapping weight 1), a loss left out keeps its weight
    in ``defaults`` (the published recipe's), so ``{"loss_bbox": 3.0}`` changes that weight only.
    """
    if isinstance(loss_weight, Mapping):
        given = dict(loss_weight)
    elif _is_number(loss_weight):
        given = dict.fromkeys(defaults, loss_weight)
    else:
        raise TypeError(
            f"{owner}: loss_weight must be a number or a mapping {{loss name: weight}} with keys in {sorted(defaults)}; "
            f"got {type(loss_weight).__name__} {loss_weight!r}."
        )
    unknown = sorted(set(given) - set(defaults))
    problems = [f"loss_weight names {unknown}, which are not its losses; expected keys in {sorted(defaults)}"] * bool(unknown)
    problems += [
        f"loss_weight[{name!r}]={value!r} must be a number >= 0"
        for name, value in given.items()
        if not _is_number(value) or value < 0
    ]
    raise_if_problems(owner, problems)
    return {name: float(given.get(name, default)) for name, default in defaults.items()}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
