"""``CfgNode``, ``get_cfg`` and ``configurable`` with the behaviour of ``detectron2.config``.

The yacs side of Detectron2's config system, for the codebases that build models with
``build_model(cfg)`` from a yacs ``CfgNode``. ``get_cfg()`` holds the subset of Detectron2's default
keys that lite's :func:`~samantics_d2.lite.modeling.build_model`, ``DefaultPredictor`` and this
project's ``from_config`` methods read, with Detectron2's default values; projects add their own
keys (``samantics_d2.add_samantics_config``) before merging a YAML file.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Optional

from fvcore.common.config import CfgNode as _FvcoreCfgNode
from iopath.common.file_io import g_pathmgr
from omegaconf import DictConfig
from yacs.config import CfgNode as _YacsCfgNode

__all__ = ["CfgNode", "configurable", "get_cfg"]

logger = logging.getLogger(__name__)

_LATEST_VERSION = 2


class CfgNode(_FvcoreCfgNode):
    """fvcore's ``CfgNode`` (``_BASE_`` inheritance, ``merge_from_list``...) with unsafe YAML loading
    allowed by default and a version check, as Detectron2's.

    Lite reads configs of the current version (2) only: Detectron2 upgrades v1 files, lite
    refuses them with an error saying so.
    """

    @classmethod
    def _open_cfg(cls, filename: str):
        return g_pathmgr.open(filename, "r")

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = True) -> None:
        """Load a YAML file (and its ``_BASE_`` files) and merge it into this config.

        Every key of the file must already exist here (add project keys first, e.g.
        ``add_samantics_config(cfg)``); yacs raises ``KeyError`` naming an unknown key.
        """
        assert g_pathmgr.isfile(cfg_filename), f"Config file '{cfg_filename}' does not exist!"
        loaded = type(self)(self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe))
        assert self.VERSION == _LATEST_VERSION, (
            "CfgNode.merge_from_file is only allowed on a config object of latest version!"
        )
        version = loaded.get("VERSION", None)
        if version is None:
            # Detectron2 guesses v1 from the keys "MODEL.WEIGHT" / "TEST.AUG_ON"; lite has no v1.
            if "WEIGHT" in loaded.get("MODEL", {}) or "AUG_ON" in loaded.get("TEST", {}):
                version = 1
            else:
                logger.warning(
                    "Config '%s' has no VERSION. Assuming it to be compatible with latest v%d.", cfg_filename,
                    _LATEST_VERSION,
                )
                version = _LATEST_VERSION
        assert version <= self.VERSION, f"Cannot merge a v{version} config into a v{self.VERSION} config."
        if version != self.VERSION:
            raise NotImplementedError(
                f"Config '{cfg_filename}' is a v{version} Detectron2 config; samantics_d2.lite reads v{self.VERSION} "
                "only. Upgrade it with Detectron2 (detectron2.config.upgrade_config) or run with Detectron2 installed."
            )
        self.merge_from_other_cfg(loaded)


# Detectron2's default values (detectron2/config/defaults.py) of the keys lite reads.
_C = CfgNode()
_C.VERSION = _LATEST_VERSION
_C.MODEL = CfgNode()
_C.MODEL.DEVICE = "cuda"
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
_C.MODEL.WEIGHTS = ""
_C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]  # BGR, the order of INPUT.FORMAT's default
_C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
_C.MODEL.BACKBONE = CfgNode()
_C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
_C.INPUT = CfgNode()
_C.INPUT.MIN_SIZE_TEST = 800  # 0 disables the test-time resize
_C.INPUT.MAX_SIZE_TEST = 1333
_C.INPUT.FORMAT = "BGR"
_C.DATASETS = CfgNode()
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()


def get_cfg() -> CfgNode:
    """A copy of the default config (a subset of Detectron2's keys, same defaults)."""
    return _C.clone()


def configurable(init_func: Optional[Callable] = None, *, from_config: Optional[Callable] = None):
    """Let a class's ``__init__`` (or a function) also be called with a config as first argument.

    On ``__init__`` the class needs a ``from_config(cls, cfg, ...)`` classmethod returning the
    keyword arguments of ``__init__``; on a function, pass ``from_config=``. ``A(a=1)`` calls
    ``__init__`` as usual; ``A(cfg)`` or ``A(cfg=cfg)`` (a yacs ``CfgNode`` or an omegaconf
    ``DictConfig``) calls ``__init__(**from_config(cfg))``; ``A(cfg, b=3)`` overrides or adds
    ``b``. Arguments that ``from_config`` does not take are passed on to ``__init__``.
    """
    if init_func is not None:
        assert inspect.isfunction(init_func) and from_config is None and init_func.__name__ == "__init__", (
            "Incorrect use of @configurable. Check API documentation for examples."
        )

        @functools.wraps(init_func)
        def wrapped_init(self, *args, **kwargs):
            try:
                cls_from_config = type(self).from_config
            except AttributeError as e:
                raise AttributeError("Class with @configurable must have a 'from_config' classmethod.") from e
            if not inspect.ismethod(cls_from_config):
                raise TypeError("Class with @configurable must have a 'from_config' classmethod.")
            if _called_with_cfg(*args, **kwargs):
                init_func(self, **_arguments_from_config(cls_from_config, *args, **kwargs))
            else:
                init_func(self, *args, **kwargs)

        return wrapped_init

    if from_config is None:
        return configurable  # @configurable() is @configurable
    assert inspect.isfunction(from_config), "from_config argument of configurable must be a function!"

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            if _called_with_cfg(*args, **kwargs):
                return func(**_arguments_from_config(from_config, *args, **kwargs))
            return func(*args, **kwargs)

        wrapped.from_config = from_config
        return wrapped

    return decorate


def _arguments_from_config(from_config: Callable, *args, **kwargs) -> dict[str, Any]:
    """``from_config(*args, **kwargs)``; keyword arguments it does not take are added to its result."""
    params = inspect.signature(from_config).parameters
    if next(iter(params), None) != "cfg":
        name = from_config.__name__ if inspect.isfunction(from_config) else f"{from_config.__self__}.from_config"
        raise TypeError(f"{name} must take 'cfg' as the first argument!")
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
        return from_config(*args, **kwargs)
    passed_on = {name: kwargs.pop(name) for name in list(kwargs) if name not in params}
    arguments = from_config(*args, **kwargs)
    arguments.update(passed_on)
    return arguments


def _called_with_cfg(*args, **kwargs) -> bool:
    """Whether the first positional argument, or the ``cfg`` keyword, is a config."""
    configs = (_YacsCfgNode, DictConfig)
    return bool(args) and isinstance(args[0], configs) or isinstance(kwargs.get("cfg"), configs)
