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
import tempfile
import uuid
from collections import abc
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Union

from iopath.common.file_io import PathManager as _PathManagerCls
from omegaconf import DictConfig, ListConfig, OmegaConf, SCMode

__all__ = ["LazyCall", "LazyConfig", "instantiate", "locate"]

logger = logging.getLogger(__name__)
_path_manager = _PathManagerCls()
# Package name given to the namespaces of executed config files; the import hook only treats
# relative imports coming from such namespaces as config imports.
_CONFIG_PACKAGE = "samantics_d2._lazy_config"


def _target_name(target: Any) -> str:
    """The dotted name under which ``locate`` finds ``target`` again."""
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
    """Import the object named by a dotted path, e.g. ``"torch.optim.SGD"``."""
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

    Lists are instantiated element-wise; a mapping with ``_target_`` becomes
    ``target(**instantiated_arguments)``; any other value (including a mapping without
    ``_target_``) is returned unchanged, as in Detectron2.
    """
    if isinstance(cfg, ListConfig):
        return ListConfig([instantiate(cfg[i]) for i in range(len(cfg))], flags={"allow_objects": True})
    if isinstance(cfg, list):
        return [instantiate(x) for x in cfg]
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
            f"{importer_file}: 'from {'.' * level} import ...' is not supported in config files; "
            f"import from a file, e.g. 'from {'.' * level}common import train'."
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
        """Load a ``.py`` or ``.yaml`` config file; returns a DictConfig, or ``cfg[k]`` for the given keys."""
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
            content = {
                name: _as_config(value)
                for name, value in namespace.items()
                if isinstance(value, (DictConfig, ListConfig, dict)) and not name.startswith("_")
            }
            cfg = DictConfig(content, flags={"allow_objects": True})
        else:
            with _path_manager.open(filename) as f:
                data = OmegaConf.to_container(OmegaConf.create(f.read()))
            if not isinstance(data, dict):
                raise ValueError(f"Config file {filename} must hold a mapping at the top level, got {type(data)}.")
            cfg = DictConfig(data, flags={"allow_objects": True})
        if keys is None:
            return cfg
        if isinstance(keys, str):
            return cfg[keys]
        return tuple(cfg[k] for k in keys)

    @staticmethod
    def save(cfg: DictConfig, filename: str) -> None:
        """Write ``cfg`` as YAML (callables as dotted names), atomically.

        A config holding values YAML cannot represent (e.g. a lambda) is not written; the reason is logged.
        """
        def to_names(node):
            if isinstance(node, dict):
                return {
                    k: _target_name(v) if k == "_target_" and callable(v) else to_names(v) for k, v in node.items()
                }
            if isinstance(node, list):
                return [to_names(v) for v in node]
            return node

        try:
            container = to_names(OmegaConf.to_container(cfg, resolve=False, structured_config_mode=SCMode.DICT))
            text = OmegaConf.to_yaml(OmegaConf.create(container), resolve=False)
        except Exception as e:  # omegaconf raises several unrelated types for unsupported values
            logger.error("Config not saved to %s: it holds a value YAML cannot represent (%s).", filename, e)
            return
        directory = os.path.dirname(os.path.abspath(filename))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".yaml")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

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

