"""Config helpers shared by ``train_net.py`` and the tools, for both backends."""
from __future__ import annotations

import difflib
import os
import inspect
import pydoc
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "USER_TOOL_OVERRIDES", "check_override_keys", "check_weights_available", "config_keys", "load_config", "missing_weights",
]

_MISSING = object()

# What the user tools (tools/segment.py, the web app) change in a config whose model takes the
# option (TrainingFreeSegmenter; other models, e.g. RefSAM, are left as written), before the user's
# own overrides (which win): a detection whose mask is empty at the image size is neither drawn (it
# would be a labelled box at the origin) nor written. Evaluation (train_net.py) keeps the config as
# written: No Time to Train's code keeps such detections.
USER_TOOL_OVERRIDES = ("model.drop_empty_masks=True",)


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


def _target(node: Any) -> Any:
    """The callable a ``LazyCall`` config node describes, or None."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._get_node("_target_")._value()
    return pydoc.locate(target) if isinstance(target, str) else target


def _target_parameter(node: Any, name: str) -> Any:
    """The ``inspect.Parameter`` ``name`` of the call a config node describes: ``_MISSING`` when the
    call takes no such keyword, None when it takes it through ``**kwargs``."""
    target = _target(node)
    if target is None:
        return _MISSING
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return _MISSING
    if name in params:
        keyword = params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return params[name] if keyword else _MISSING
    return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else _MISSING


def _declares(cfg: DictConfig, key: str) -> bool:
    """Whether ``cfg`` holds the dotted ``key``, or the call of its parent node names it as a parameter."""
    if OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING:
        return True
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    return isinstance(_target_parameter(parent, leaf), inspect.Parameter)


def _target_accepts(node: Any, name: str) -> bool:
    """Whether the call a config node describes takes a keyword argument ``name``."""
    return _target_parameter(node, name) is not _MISSING


# What an override may put where the config holds a value of one of these kinds (None, interpolations
# and unknown types accept anything). Like Detectron2's apply_overrides, the string "None" means None.
_KINDS = (
    (bool, "a boolean (true/false)", (bool,)),
    (int, "an integer", (int,)),
    (float, "a number", (int, float)),
    (str, "a string (quote digits: key='2')", (str,)),
    ((list, tuple, ListConfig), "a list ([a,b])", (list,)),
    ((dict, DictConfig), "a mapping ({k:v})", (dict,)),
)


def _expected_kind(current: Any) -> Any:
    for kind, words, allowed in _KINDS:
        if isinstance(current, kind):
            return words, allowed
    return None


def _current_value(cfg: DictConfig, key: str) -> Any:
    """The value ``key`` holds in ``cfg`` (``_MISSING`` for an interpolation or an absent key), else
    the default of the ``LazyCall`` argument it names."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf in parent:
        node = parent._get_node(leaf)
        if isinstance(node, (DictConfig, ListConfig)):
            return node
        return _MISSING if node._is_interpolation() else node._value()
    if isinstance(parent, ListConfig) and leaf.isdigit() and int(leaf) < len(parent):
        node = parent._get_node(int(leaf))
        return node if isinstance(node, (DictConfig, ListConfig)) else node._value()
    param = _target_parameter(parent, leaf)
    if param is _MISSING or param is None or param.default is inspect.Parameter.empty:
        return _MISSING
    return param.default


def check_override_keys(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """Reject ``key=value`` overrides whose key is not in ``cfg``, or whose value has the wrong type,
    before anything runs.

    A key is accepted when it exists in the config, or when its parent node is a ``LazyCall``
    whose target takes that keyword argument (setting an argument left at its default).
    Detectron2's own ``apply_overrides`` would silently add a misspelt key; this raises a
    ``KeyError`` naming the key and the closest existing keys. The value must be of the kind the
    config (or the argument's default) holds there: an integer for ``train.max_iter``, a number
    for a float, ... (``TypeError`` naming the key, the value and the expected type). Keys that
    hold None, an interpolation or no default take any value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    if not overrides:
        return
    parsed = OverridesParser.create().parse_overrides(overrides)
    known = None
    for o in parsed:
        key = o.key_or_group
        exists = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if exists or _target_accepts(parent, leaf):
            _check_override_value(cfg, key, o.value(), o.input_line)
            continue
        known = known if known is not None else config_keys(cfg)
        close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
        hint = f" Closest existing keys: {', '.join(close)}." if close else ""
        raise KeyError(
            f"Override {o.input_line!r}: key {key!r} does not exist in the config.{hint} "
            "Check the spelling; keys are dotted paths such as train.max_iter."
        )


def load_config(config_file: str, overrides: Sequence[str] = (), *, user_tool: bool = False) -> DictConfig:
    """``LazyConfig.load(config_file)`` with the ``key=value`` ``overrides`` checked
    (:func:`check_override_keys`: a misspelt key or a wrong type fails here, naming it) and applied.

    ``user_tool``: the config of a tool that shows results to a user (tools/segment.py, the web app):
    each of :data:`USER_TOOL_OVERRIDES` whose key the config holds or its call declares by name (not
    through ``**kwargs``) goes first, so the user's own ``overrides`` win.
    """
    from .d2 import LazyConfig

    cfg = LazyConfig.load(config_file)
    tool = [o for o in USER_TOOL_OVERRIDES if _declares(cfg, o.split("=", 1)[0])] if user_tool else []
    overrides = [*tool, *overrides]
    check_override_keys(cfg, overrides)
    return LazyConfig.apply_overrides(cfg, overrides)


def _check_override_value(cfg: DictConfig, key: str, value: Any, input_line: str) -> None:
    if value is None:
        return
    current = _current_value(cfg, key)
    expected = None if current is _MISSING or current is None else _expected_kind(current)
    if expected is None:
        return
    words, allowed = expected
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return
    shown = current if not isinstance(current, (DictConfig, ListConfig)) else OmegaConf.to_container(current)
    raise TypeError(
        f"Override {input_line!r}: {key} expects {words} (the config holds {shown!r}), got {value!r} "
        f"({type(value).__name__}). Give a value of that type, e.g. {key}={_example(current)}"
        + (f", or {key}=null for None (Hydra's override syntax: None is the string 'None')." if value == "None" else ".")
    )


def _example(current: Any) -> str:
    if isinstance(current, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(current)).replace(" ", "")
    if isinstance(current, bool):
        return str(current).lower()
    return repr(current) if isinstance(current, str) else str(current)


# ----------------------------------------------------------------------------- weights of a config

_DEMO_HINT = (
    "To try the project without weights: `make demo` (tiny models trained on the synthetic shapes data), "
    "or the tiny configs configs/training_free/shapes_tiny.py (with the demo's tiny SAM), "
    "configs/training_free/shapes_tiny_random.py, configs/quick/*.py and configs/*/tiny_shapes.py; "
    "README section 'Try it without weights'."
)


def _weight_references(cfg: Any) -> list[str]:
    """The weight tags / files a config's ``LazyCall`` nodes will load: ``build_encoder(tag,
    pretrained=True[, weights])`` and any ``weights`` / ``*_weights`` argument (in config order)."""
    found: list[str] = []

    def value(node: DictConfig, key: str) -> Any:
        try:
            return node.get(key)
        except Exception:  # an interpolation that cannot be resolved yet: instantiate reports it
            return None

    def walk(node: Any) -> None:
        if isinstance(node, DictConfig):
            target = _target(node)
            name = getattr(target, "__name__", "")
            for key in node.keys():
                if key == "_target_":
                    continue
                child = node._get_node(key)
                if isinstance(child, (DictConfig, ListConfig)):
                    walk(child)
                elif name == "build_encoder" and key in ("tag", "weights"):
                    continue  # below: only when pretrained
                elif (key == "weights" or str(key).endswith("_weights")) and isinstance(value(node, key), str):
                    found.append(value(node, key))
            if name == "build_encoder" and value(node, "pretrained") and value(node, "size") in (None, "full"):
                found.append(value(node, "weights") or value(node, "tag"))
        elif isinstance(node, ListConfig):
            for child in node._iter_ex(resolve=False):
                walk(child)

    walk(cfg)
    return [w for w in dict.fromkeys(found) if isinstance(w, str) and w]


def missing_weights(cfg: DictConfig) -> list[str]:
    """One line per weight file ``cfg`` needs that is not available (empty: all are there)."""
    from .modeling.weights import resolve_weights

    missing = []
    for weights in _weight_references(cfg):
        try:
            resolve_weights(weights)
        except FileNotFoundError as e:
            missing.append(str(e))
        except KeyError:
            continue  # not a tag nor a file name: building the model names the valid tags
    return missing


def check_weights_available(cfg: DictConfig, config_file: str = "the config") -> None:
    """Raise ``FileNotFoundError`` listing every weight file ``cfg`` needs and lacks, at once,
    with where to put them and how to try the project without weights."""
    from .modeling.weights import WEIGHTS_ENV

    missing = missing_weights(cfg)
    if not missing:
        return
    root = os.environ.get(WEIGHTS_ENV)
    where = f"${WEIGHTS_ENV} is {root}" if root else f"${WEIGHTS_ENV} is not set"
    lines = "\n".join(f"  - {m}" for m in missing)
    raise FileNotFoundError(
        f"{config_file} needs {len(missing)} weight file(s) that are not available ({where}; nothing is ever "
        f"downloaded):\n{lines}\nPut the official files under their published names in one folder and set "
        f"{WEIGHTS_ENV} to it. {_DEMO_HINT}"
    )


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_file(path: str, *, example: str) -> str:
    """A tool's ``--config-file``: ``path`` as given if it exists (or is absolute), else relative to
    the project folder, where the configs live (so tools run from any folder).

    Raises:
        FileNotFoundError: neither exists; the message names both places and ``example``.
    """
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    in_project = os.path.join(PROJECT_ROOT, path)
    if os.path.isfile(in_project):
        return in_project
    raise FileNotFoundError(f"--config-file {path}: no such file here ({os.getcwd()}) nor in the project folder "
                            f"({PROJECT_ROOT}). Give a LazyConfig .py file, e.g. {example}.")
