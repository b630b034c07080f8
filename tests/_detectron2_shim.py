"""A pytest plug-in that runs Detectron2's own unit tests against ``samantics_d2.lite``.

Loaded only by ``tests/test_detectron2_contract.py``, in a subprocess (``pytest -p _detectron2_shim``):
it puts an import hook first on ``sys.meta_path`` that answers every ``import detectron2...`` with
a stand-in module whose attributes are those of the matching lite module (``detectron2.structures``
-> ``samantics_d2.lite.structures``, ...). A name lite does not have resolves to a placeholder that
raises when used, so a test file still imports and only the tests using such a name fail; those are
the tests the contract test deselects, each with its reason. ``detectron2.utils.testing`` is
answered with the two test helpers below (our own code). The outcome of every test is written as
JSON to ``$D2_SHIM_REPORT`` (``"deselected"`` for the tests deselected on the command line).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import io
import json
import os
import sys
import tempfile
import types
from typing import Any

os.environ["SAMANTICS_D2_BACKEND"] = "lite"

_LITE = "samantics_d2.lite"
# Detectron2 module -> the lite modules that provide its names (searched in order).
_SOURCES: dict[str, tuple[str, ...]] = {
    "detectron2.checkpoint": (f"{_LITE}.checkpoint",),
    "detectron2.checkpoint.c2_model_loading": (f"{_LITE}.checkpoint",),
    "detectron2.config": (f"{_LITE}.config", f"{_LITE}.yacs_config"),
    "detectron2.data": (f"{_LITE}.data",),
    "detectron2.data.build": (f"{_LITE}.data.build",),
    "detectron2.data.common": (f"{_LITE}.data.build",),
    "detectron2.data.samplers": (f"{_LITE}.data.build",),
    "detectron2.data.datasets": (f"{_LITE}.data",),
    "detectron2.engine": (f"{_LITE}.engine", _LITE),
    "detectron2.engine.hooks": (f"{_LITE}.hooks",),
    "detectron2.layers": (f"{_LITE}.modeling",),
    "detectron2.modeling": (f"{_LITE}.modeling",),
    "detectron2.modeling.meta_arch": (f"{_LITE}.modeling",),
    "detectron2.solver": (f"{_LITE}.solver",),
    "detectron2.structures": (f"{_LITE}.structures",),
    "detectron2.structures.boxes": (f"{_LITE}.structures",),
    "detectron2.structures.masks": (f"{_LITE}.structures",),
    "detectron2.utils": (_LITE,),
    "detectron2.utils.comm": (f"{_LITE}.comm",),
    "detectron2.utils.env": (f"{_LITE}.env",),
    "detectron2.utils.events": (f"{_LITE}.events",),
    "detectron2.utils.logger": (f"{_LITE}.logger",),
    "detectron2.utils.testing": (__name__,),
}


# --- detectron2.utils.testing: the helpers Detectron2's tests use, written for lite ---------------
def reload_lazy_config(cfg: Any) -> Any:
    """Save ``cfg`` with ``LazyConfig.save`` and load it back (tests that a config survives a round trip)."""
    from samantics_d2.lite.config import LazyConfig

    with tempfile.TemporaryDirectory(prefix="lite_lazy_config") as d:
        path = os.path.join(d, "config.yaml")
        LazyConfig.save(cfg, path)
        return LazyConfig.load(path)


def reload_script_model(module: Any) -> Any:
    """Serialize a scripted module to memory and load it back."""
    import torch

    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


class _NotInLite:
    """Stands for a Detectron2 name that lite does not provide; any use raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self._name} is not provided by samantics_d2.lite")

    __call__ = _fail

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._fail()

    def __repr__(self) -> str:
        return f"<{self._name}: not in samantics_d2.lite>"


class _ShimModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for source in _SOURCES.get(self.__name__, ()):
            module = importlib.import_module(source)
            if hasattr(module, attr):
                return getattr(module, attr)
        sub = f"{self.__name__}.{attr}"
        if sub in _SOURCES:
            return importlib.import_module(sub)
        return _NotInLite(sub)


class _Detectron2ToLite(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname == "detectron2" or fullname.startswith("detectron2."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _ShimModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


for _name in [n for n in sys.modules if n == "detectron2" or n.startswith("detectron2.")]:
    del sys.modules[_name]
sys.meta_path.insert(0, _Detectron2ToLite())


# --- outcome report --------------------------------------------------------------------------------
_outcomes: dict[str, str] = {}


def pytest_collectreport(report) -> None:
    if report.failed:
        _outcomes[report.nodeid] = "collection error"


def pytest_deselected(items) -> None:
    for item in items:
        _outcomes[item.nodeid] = "deselected"


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":
        # A failure in setup/teardown overrides the call's outcome.
        if report.nodeid not in _outcomes or report.outcome != "passed":
            _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("D2_SHIM_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_outcomes, f, indent=1, sort_keys=True)
