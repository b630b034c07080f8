"""``LazyCall``, ``LazyConfig`` and ``instantiate`` with the behaviour of ``detectron2.config``.

A lazy config is an omegaconf ``DictConfig`` tree; a node with a ``_target_`` key describes a call
(``_target_`` is a callable or its dotted name, the other keys are its keyword arguments) that
:func:`instantiate` performs, children first. Python config files may import names from other
config files with relative imports (``from ..common.train import train``); those files are
executed as configs too, so what they define arrives as ``DictConfig``.
"""
from __future__ import annotations

import builtins
import dataclasses
import importlib
import logging
import os
import pydoc
import sys
import uuid
from collections import abc
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import cloudpickle
import yaml
from iopath.common.file_io import PathManager as _PathManagerCls
from omegaconf import DictConfig, ListConfig, OmegaConf, SCMode

from ..utils.io import atomic_path

__all__ = ["LazyCall", "LazyConfig", "instantiate", "locate"]

logger = logging.getLogger(__name__)
_path_manager = _PathManagerCls()
# Package name given to the namespaces of executed config files; the import hook only treats
# relative imports coming from such namespaces as config imports.
_CONFIG_PACKAGE = "samantics_d2._lazy_config"


# The seam (samantics_d2.d2) binds itself here when it runs on lite (bind_seam): this module does not
# import it, since the seam imports this module.
_seam: Optional[ModuleType] = None


def bind_seam(seam: ModuleType) -> None:
    """Called by :mod:`samantics_d2.d2` on lite: the module whose ``__all__`` names are the seam's."""
    global _seam
    _seam = seam


def _seam_names() -> tuple[ModuleType, Sequence[str]]:
    if _seam is None:
        raise RuntimeError("samantics_d2.lite.config is used without the seam: import samantics_d2.d2 first.")
    return _seam, _seam.__all__


def _seam_name(target: Any) -> Optional[str]:
    """``samantics_d2.d2.<name>`` when ``target`` is a Detectron2 name exported by the seam, so that a
    config saved with lite names it in a way Detectron2 mode resolves to Detectron2's own object."""
    seam, names = _seam_names()
    name = getattr(target, "__name__", None)
    return f"samantics_d2.d2.{name}" if name in names and getattr(seam, name, None) is target else None


def _detectron2_target(name: str) -> Any:
    """A ``detectron2.*`` target (a config saved with Detectron2) under lite: the seam's object of the
    same name; otherwise Detectron2's own when it is importable; otherwise an ImportError saying why."""
    seam, names = _seam_names()
    attr = name.rsplit(".", 1)[-1]
    if attr in names:
        return getattr(seam, attr)
    obj = pydoc.locate(name)
    if obj is not None:
        return obj
    raise ImportError(
        f"Cannot locate {name!r}: the config names a Detectron2 object (it was saved with Detectron2), "
        f"Detectron2 is not importable, and samantics_d2.lite provides no {attr!r} (it provides the names of "
        "samantics_d2.d2.__all__). Install Detectron2, or change this _target_ in the config."
    )


def _target_name(target: Any) -> str:
    """The dotted name under which ``locate`` finds ``target`` again (for the seam's names, one that
    both backends resolve)."""
    seam = _seam_name(target)
    if seam is not None:
        return seam
    module, qualname = target.__module__, target.__qualname__
    # Prefer the shortest public module path that still resolves to the same object.
    parts = module.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[:i]) + "." + qualname
        try:
            if locate(candidate) is target:
                return candidate
        except ImportError:
            continue
    return module + "." + qualname


def locate(name: str) -> Any:
    """Import the object named by a dotted path, e.g. ``"torch.optim.SGD"``; ``detectron2.*`` names
    resolve to the seam's objects of the same name (see :func:`_detectron2_target`)."""
    if name.startswith("detectron2."):
        return _detectron2_target(name)
    obj = pydoc.locate(name)
    if obj is not None:
        return obj
    # pydoc cannot follow attributes of classes defined in modules it failed to import; walk it.
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ImportError(f"Cannot locate {name!r}: no importable module or attribute of that name.")


class LazyCall:
    """``LazyCall(f)(x=1)`` returns a config node that :func:`instantiate` turns into ``f(x=1)``."""

    def __init__(self, target: Union[Callable, str, abc.Mapping]):
        if not (callable(target) or isinstance(target, (str, abc.Mapping))):
            raise TypeError(f"LazyCall target must be a callable, a dotted name or a config; got {target!r}")
        self._target = target

    def __call__(self, **kwargs) -> DictConfig:
        target = self._target
        if dataclasses.is_dataclass(target):
            target = _target_name(target)  # omegaconf would turn a dataclass into a structured config
        kwargs["_target_"] = target
        return DictConfig(content=kwargs, flags={"allow_objects": True})


def instantiate(cfg: Any) -> Any:
    """Perform the calls a config describes, recursively.

    Lists are instantiated element-wise; a structured config node (what omegaconf makes of a
    dataclass object such as ``ShapeSpec(...)`` given as an argument) becomes that dataclass object
    again; a mapping with ``_target_`` becomes ``target(**instantiated_arguments)``; any other value
    (including a mapping without ``_target_``) is returned unchanged, as in Detectron2.
    """
    if isinstance(cfg, ListConfig):
        return ListConfig([instantiate(cfg[i]) for i in range(len(cfg))], flags={"allow_objects": True})
    if isinstance(cfg, list):
        return [instantiate(x) for x in cfg]
    if isinstance(cfg, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(cfg)):
        return OmegaConf.to_object(cfg)
    if isinstance(cfg, abc.Mapping) and "_target_" in cfg:
        kwargs = {k: instantiate(v) for k, v in cfg.items() if k != "_target_"}
        target = cfg["_target_"]
        target = instantiate(target)
        if isinstance(target, str):
            name = target
            target = locate(name)
        else:
            name = getattr(target, "__qualname__", repr(target))
        if not callable(target):
            raise TypeError(f"_target_ {name!r} of a config node is not callable (got {type(target)}).")
        try:
            return target(**kwargs)
        except TypeError as e:
            raise TypeError(f"Error instantiating {name!r} with arguments {sorted(kwargs)}: {e}") from e
    return cfg


def _as_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        return DictConfig(obj, flags={"allow_objects": True})
    return obj


def _config_file_for(importer_file: str, name: str, level: int) -> str:
    """The file a relative ``import`` statement in ``importer_file`` refers to."""
    directory = os.path.dirname(importer_file)
    for _ in range(level - 1):
        directory = os.path.dirname(directory)
    parts = [p for p in name.split(".") if p]
    if not parts:
        raise ImportError(
            f"{importer_file}: the relative import 'from {'.' * level} import ...' names a folder, which config "
            f"files cannot import; import from a file, e.g. 'from {'.' * level}common import train'."
        )
    path = os.path.join(directory, *parts)
    if not path.endswith(".py"):
        path += ".py"
    if not _path_manager.isfile(path):
        raise ImportError(
            f"{importer_file} imports {'.' * level}{name}, but {path} does not exist. Relative imports in a "
            "config file must name another config file."
        )
    return path


def _execute_config_file(filename: str, namespace: dict) -> None:
    with _path_manager.open(filename) as f:
        source = f.read()
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as e:
        raise SyntaxError(f"Config file {filename} has invalid Python syntax: {e}") from e
    exec(code, namespace)


@contextmanager
def _config_imports() -> Iterator[None]:
    """While active, relative imports inside config files load the imported file as a config."""
    original_import = builtins.__import__

    def config_import(name, globals=None, locals=None, fromlist=(), level=0):
        package = (globals or {}).get("__package__") or ""
        if level == 0 or not package.startswith(_CONFIG_PACKAGE):
            return original_import(name, globals, locals, fromlist, level)
        path = _config_file_for(globals["__file__"], name, level)
        spec = importlib.machinery.ModuleSpec(f"{_CONFIG_PACKAGE}.{uuid.uuid4().hex[:12]}", None, origin=path)
        module = importlib.util.module_from_spec(spec)
        module.__file__ = path
        _execute_config_file(path, module.__dict__)
        for attr in fromlist or ():
            if attr not in module.__dict__:
                raise ImportError(f"Cannot import {attr!r} from config file {path}.")
            module.__dict__[attr] = _as_config(module.__dict__[attr])
        return module

    builtins.__import__ = config_import
    try:
        yield
    finally:
        builtins.__import__ = original_import


class LazyConfig:
    """Load, save and override lazy configs (Python or YAML files)."""

    @staticmethod
    def load(filename: str, keys: Union[None, str, tuple[str, ...]] = None):
        """Load a ``.py`` or ``.yaml`` config file; returns a DictConfig of its config objects, or, for
        ``keys``, the value(s) the file defines under those names (dicts as DictConfig)."""
        filename = str(filename).replace("/./", "/")
        if os.path.splitext(filename)[1] not in (".py", ".yaml", ".yml"):
            raise ValueError(f"Config file {filename} must be a .py or .yaml file.")
        if not _path_manager.isfile(filename):
            raise FileNotFoundError(f"Config file {filename} does not exist.")
        if filename.endswith(".py"):
            namespace = {
                "__file__": filename,
                "__package__": f"{_CONFIG_PACKAGE}.{uuid.uuid4().hex[:12]}",
                "__name__": f"{_CONFIG_PACKAGE}.{uuid.uuid4().hex[:12]}",
            }
            with _config_imports():
                _execute_config_file(filename, namespace)
            if keys is not None:  # named keys may be any value the file defines, not only configs
                return _as_config(namespace[keys]) if isinstance(keys, str) else tuple(_as_config(namespace[k]) for k in keys)
            content = {
                name: _as_config(value)
                for name, value in namespace.items()
                if isinstance(value, (DictConfig, ListConfig, dict)) and not name.startswith("_")
            }
            cfg = DictConfig(content, flags={"allow_objects": True})
        else:
            with _path_manager.open(filename) as f:
                # As Detectron2: the python-object tags LazyConfig.save writes for dataclasses need the full loader.
                data = yaml.unsafe_load(f)
            if not isinstance(data, dict):
                raise ValueError(f"Config file {filename} must hold a mapping at the top level, got {type(data)}.")
            cfg = DictConfig(data, flags={"allow_objects": True})
        if keys is None:
            return cfg
        if isinstance(keys, str):
            return cfg[keys]
        return tuple(cfg[k] for k in keys)

    @staticmethod
    def load_rel(filename: str, keys: Union[None, str, tuple[str, ...]] = None):
        """:meth:`load` with ``filename`` relative to the folder of the config file that calls it.

        Like a relative import, but the file name is a string (so it may hold any character).
        """
        caller_file = sys._getframe(1).f_code.co_filename
        if caller_file.startswith("<"):
            raise RuntimeError(
                f"LazyConfig.load_rel({filename!r}) was called from {caller_file}, which is not a file: call it "
                "from a config file, or use LazyConfig.load with a full path."
            )
        return LazyConfig.load(os.path.join(os.path.dirname(caller_file), filename), keys)

    @staticmethod
    def save(cfg: DictConfig, filename: str) -> None:
        """Write ``cfg`` as YAML, atomically; callables become dotted names, dataclass objects YAML
        python-object tags (so that :meth:`load` rebuilds them).

        A config YAML cannot hold (e.g. one with a lambda) is also pickled with cloudpickle to
        ``filename + ".pkl"``, as Detectron2 does; the YAML is still written when it could be
        dumped (it then cannot be loaded back). The reason is logged as a warning.
        """
        def to_names(node):
            if isinstance(node, dict):
                return {
                    k: _target_name(v) if k == "_target_" and callable(v) else to_names(v) for k, v in node.items()
                }
            if isinstance(node, list):
                return [to_names(v) for v in node]
            return node

        save_pickle = False
        try:
            container = OmegaConf.to_container(
                cfg, resolve=False, enum_to_str=True, structured_config_mode=SCMode.INSTANTIATE
            )
            text = yaml.dump(to_names(container), default_flow_style=None, allow_unicode=True, width=9999)
            with atomic_path(filename) as tmp, open(tmp, "w") as f:
                f.write(text)
            try:
                yaml.unsafe_load(text)
            except Exception as e:  # yaml raises several types for objects it dumped but cannot rebuild
                logger.warning("The config saved to %s cannot be loaded back from YAML (%s).", filename, e)
                save_pickle = True
        except Exception as e:  # omegaconf and yaml raise several unrelated types for unsupported values
            logger.warning("The config cannot be written as YAML to %s (%s).", filename, e)
            save_pickle = True
        if save_pickle:
            pickle_file = filename + ".pkl"
            with atomic_path(pickle_file) as tmp, open(tmp, "wb") as f:
                cloudpickle.dump(cfg, f)
            logger.warning("Config saved with cloudpickle to %s.", pickle_file)

    @staticmethod
    def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
        """Apply ``key=value`` overrides (Hydra syntax for values), in place; returns ``cfg``.

        As in Detectron2, a key that does not exist yet is added; use
        :func:`samantics_d2.config.check_override_keys` first to reject misspelt keys.
        """
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(overrides))
        for o in parsed:
            key, value = o.key_or_group, o.value()
            if o.is_delete():
                raise NotImplementedError(f"Override {o.input_line!r}: deleting keys is not supported.")
            parts = key.split(".")
            for i in range(1, len(parts)):
                prefix = ".".join(parts[:i])
                node = OmegaConf.select(cfg, prefix, default=None)
                if node is None:
                    break
                if not OmegaConf.is_config(node):
                    raise KeyError(f"Cannot override {key}: {prefix} is a {type(node).__name__}, not a config node.")
            OmegaConf.update(cfg, key, value, merge=True)
        return cfg

