"""Config helpers shared by ``train_net.py`` and the tools, for both backends."""
from __future__ import annotations

import difflib
import inspect
import pydoc
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["check_override_keys", "config_keys"]

_MISSING = object()


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a config tree (``_target_`` entries excluded), depth first."""
    keys: list[str] = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            if k == "_target_":
                continue
            path = f"{prefix}.{k}" if prefix else str(k)
            keys.append(path)
            node = cfg._get_node(k)
            if isinstance(node, (DictConfig, ListConfig)):
                keys.extend(config_keys(node, path))
    elif isinstance(cfg, ListConfig):
        for i, node in enumerate(cfg._iter_ex(resolve=False)):
            path = f"{prefix}.{i}"
            keys.append(path)
            if isinstance(node, (DictConfig, ListConfig)):
                keys.extend(config_keys(node, path))
    return keys


def _target_accepts(node: Any, name: str) -> bool:
    """Whether the call a config node describes takes a keyword argument ``name``."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    target = node._get_node("_target_")._value()
    if isinstance(target, str):
        target = pydoc.locate(target)
    if target is None:
        return False
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_override_keys(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """Reject ``key=value`` overrides whose key is not in ``cfg``, before anything runs.

    A key is accepted when it exists in the config, or when its parent node is a ``LazyCall``
    whose target takes that keyword argument (setting an argument left at its default).
    Detectron2's own ``apply_overrides`` would silently add a misspelt key; this raises a
    ``KeyError`` naming the key and the closest existing keys.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    if not overrides:
        return
    parsed = OverridesParser.create().parse_overrides(overrides)
    known = None
    for o in parsed:
        key = o.key_or_group
        if OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING:
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if _target_accepts(parent, leaf):
            continue
        known = known if known is not None else config_keys(cfg)
        close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
        hint = f" Closest existing keys: {', '.join(close)}." if close else ""
        raise KeyError(
            f"Override {o.input_line!r}: key {key!r} does not exist in the config.{hint} "
            "Check the spelling; keys are dotted paths such as train.max_iter."
        )
