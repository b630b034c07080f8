"""Argument checks that report every problem at once."""
from __future__ import annotations

from typing import Sequence

__all__ = ["raise_if_problems"]


def raise_if_problems(owner: str, problems: Sequence[str]) -> None:
    """``ValueError("<owner>: <problem>; <problem>.")`` when ``problems`` is not empty.

    Constructors collect what is wrong with their arguments into ``problems`` (each naming the
    value received and what was expected) so that one error lists them all.
    """
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems) + ".")
