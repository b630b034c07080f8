"""``DatasetCatalog`` and ``MetadataCatalog``, as in ``detectron2.data.catalog``.

A dataset is registered as a function returning its list of dataset dicts, so that registering is
cheap and loading happens when ``DatasetCatalog.get`` is called. Its metadata (class names, json
file, evaluator type, ...) lives in a ``Metadata`` object whose attributes cannot be changed to a
different value once set.
"""
from __future__ import annotations

import logging
from collections import UserDict
from typing import Any, Callable

__all__ = ["DatasetCatalog", "Metadata", "MetadataCatalog"]

logger = logging.getLogger(__name__)


class _DatasetCatalog(UserDict):
    """Map from dataset name to a function returning its dataset dicts (``list[dict]``)."""

    def register(self, name: str, func: Callable[[], Any]) -> None:
        """Register ``func`` (no arguments, returns ``list[dict]``) under ``name``."""
        if not callable(func):
            raise TypeError(
                f"DatasetCatalog.register({name!r}, ...) got {func!r}; expected a callable returning list[dict]."
            )
        if name in self:
            raise KeyError(
                f"Dataset {name!r} is already registered. Pick another name, or call "
                f"DatasetCatalog.remove({name!r}) first to replace it."
            )
        self[name] = func

    def get(self, name: str) -> Any:
        """Call the registered function of ``name`` and return what it returns (usually ``list[dict]``)."""
        try:
            func = self[name]
        except KeyError as e:
            raise KeyError(
                f"Dataset {name!r} is not registered. Registered datasets: {', '.join(sorted(self.keys())) or '<none>'}."
            ) from e
        return func()

    def list(self) -> list[str]:
        """Names of all registered datasets."""
        return list(self.keys())

    def remove(self, name: str) -> None:
        """Unregister ``name``."""
        self.pop(name)

    def __str__(self) -> str:
        return f"DatasetCatalog(registered datasets: {', '.join(self.keys())})"

    __repr__ = __str__


DatasetCatalog = _DatasetCatalog()


class Metadata:
    """Attributes describing a dataset; once set, an attribute cannot be set to a different value.

    ``Metadata(name="coco_2017_val").set(thing_classes=[...])``; read with ``meta.thing_classes`` or
    ``meta.get("thing_classes", default)``.
    """

    name: str = "N/A"

    def __init__(self, **kwargs: Any):
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails, i.e. the attribute was never set.
        if key.startswith("__"):
            raise AttributeError(key)
        raise AttributeError(
            f"Attribute {key!r} does not exist in the metadata of dataset {self.name!r}. "
            f"Available keys: {sorted(self.__dict__.keys())}."
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dict__:
            old = self.__dict__[key]
            if old is not value and _differs(old, value):
                raise AttributeError(
                    f"Attribute {key!r} in the metadata of {self.name!r} cannot be set to a different value: "
                    f"it is {old!r}, got {value!r}. Metadata is fixed once set; use another dataset name or "
                    f"MetadataCatalog.remove({self.name!r}) first."
                )
        super().__setattr__(key, value)

    def as_dict(self) -> dict[str, Any]:
        """A shallow copy of all attributes."""
        return dict(self.__dict__)

    def set(self, **kwargs: Any) -> "Metadata":
        """Set several attributes; returns ``self``."""
        for key, value in kwargs.items():
            setattr(self, key, value)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        """The attribute ``key``, or ``default`` when it is not set."""
        return self.__dict__.get(key, default)

    def __repr__(self) -> str:
        return f"Metadata({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def _differs(old: Any, new: Any) -> bool:
    try:
        return bool(old != new)
    except ValueError:  # e.g. numpy arrays: elementwise comparison has no single truth value
        return True


class _MetadataCatalog(UserDict):
    """Map from dataset name to its ``Metadata``, created empty on first ``get``."""

    def get(self, name: str) -> Metadata:  # type: ignore[override]
        if not name:
            raise ValueError("MetadataCatalog.get got an empty dataset name.")
        metadata = self.data.get(name)
        if metadata is None:
            metadata = self.data[name] = Metadata(name=name)
        return metadata

    def list(self) -> list[str]:
        """Names of all datasets that have metadata."""
        return list(self.keys())

    def remove(self, name: str) -> None:
        """Drop the metadata of ``name``."""
        self.pop(name)

    def __str__(self) -> str:
        return f"MetadataCatalog(registered metadata: {', '.join(self.keys())})"

    __repr__ = __str__


MetadataCatalog = _MetadataCatalog()
