"""``DetectionCheckpointer``: fvcore's ``Checkpointer`` with Detectron2's defaults.

Differences from the plain fvcore class, as in ``detectron2.checkpoint``: only the main process
writes by default; a DistributedDataParallel model is unwrapped (fvcore does this). In addition,
checkpoints and the ``last_checkpoint`` tag are written atomically (temporary file, then rename),
files are loaded on CPU with ``weights_only=True``, and a missing file is an error naming it.

Also as in Detectron2: ``path?matching_heuristics=True`` loads a state dict whose names lack the
model's prefixes (each model parameter takes the checkpoint entry whose name is its longest
dot-suffix); Detectron2 model-zoo ``.pkl`` files (numpy arrays, read without running any code
they might name) load, with those heuristics when the file asks for them, and pycls ``.pyth`` files
load with them. Caffe2 (Detectron v1) ``.pkl`` files, whose names need Detectron2's Caffe2
renaming, are refused with an explanation.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import IO, Any, Callable, Optional
from urllib.parse import parse_qs, urlparse

import torch
from fvcore.common.checkpoint import Checkpointer
from torch import nn

from ..utils.io import atomic_path, checkpoint_read_error
from . import comm

__all__ = ["DetectionCheckpointer", "atomic_write"]

logger = logging.getLogger(__name__)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace the local file ``path`` with what ``write(binary file)`` writes.

    The data goes to a temporary file next to ``path`` that is then renamed over it, so an
    interrupted write leaves either the old file or the new one, never half a file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


class DetectionCheckpointer(Checkpointer):
    """Save and load a model and other checkpointables (optimizer, trainer, ...) as ``.pth`` files.

    Args:
        model: the model (a DistributedDataParallel wrapper is unwrapped).
        save_dir: where checkpoints and ``last_checkpoint`` are written and looked for.
        save_to_disk: whether this process writes; default: only the main process.
        checkpointables: objects with ``state_dict()``/``load_state_dict()`` saved under their keyword,
            e.g. ``trainer=trainer`` (iteration, optimizer, LR scheduler state).

    ``resume_or_load(path, resume=True)`` loads the checkpoint named in ``save_dir/last_checkpoint``
    with all checkpointables when there is one, else only the model weights from ``path``.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(
            model,
            save_dir,
            save_to_disk=comm.is_main_process() if save_to_disk is None else save_to_disk,
            **checkpointables,
        )
        self.logger = logger

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` (model, checkpointables, ``kwargs``) and tag it as the last one."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Write ``last_checkpoint`` (the basename of the newest checkpoint), atomically."""
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename.encode()))

    def load(self, path: str, checkpointables: Optional[list[str]] = None) -> dict[str, Any]:
        """Load ``path`` (an empty path loads nothing); see fvcore ``Checkpointer.load``.

        Returns what the file holds beyond the model and the loaded checkpointables (e.g. ``iteration``).
        """
        self._matching_heuristics = False
        if path and "?" in path:
            parsed = urlparse(path)
            queries = parse_qs(parsed.query)
            self._matching_heuristics = queries.pop("matching_heuristics", ["False"]) == ["True"]
            if queries:
                raise ValueError(
                    f"Checkpoint path {path!r} has the query {queries}; the only query understood is "
                    "'?matching_heuristics=True'."
                )
            path = parsed._replace(query="").geturl()
        if path and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):  # AssertionError, as fvcore's Checkpointer in Detectron2
                raise AssertionError(
                    f"Checkpoint {path!r} not found. Give an existing .pth file (e.g. train.init_checkpoint=...), "
                    "or an empty path to start from the model's initial weights."
                )
            path = local
        return super().load(path, checkpointables)

    def _load_file(self, f: str) -> dict[str, Any]:
        """Read a checkpoint on CPU; a bare state dict is treated as ``{"model": state_dict}``."""
        if f.endswith(".pkl"):
            loaded = _load_model_zoo_pickle(f)
            if self._matching_heuristics:
                loaded["matching_heuristics"] = True
            return loaded
        if f.endswith(".pyth"):  # pycls (only pycls uses this extension)
            state = self._load_torch_file(f)
            if "model_state" not in state:
                raise ValueError(f"{f}: a pycls .pyth checkpoint must hold 'model_state'; it holds {sorted(state)}.")
            model_state = {k: v for k, v in state["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        loaded = self._load_torch_file(f)
        if "model" not in loaded:
            loaded = {"model": loaded}
        if self._matching_heuristics:
            loaded["matching_heuristics"] = True
        return loaded

    def _load_torch_file(self, f: str) -> dict[str, Any]:
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:
            message, refers_to_code = checkpoint_read_error(f, e)
            if refers_to_code:
                message += (" Checkpoints written by DetectionCheckpointer load this way; for another file you "
                            "trust, re-save its state dict with torch.save(state_dict).")
            raise RuntimeError(message) from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{f} holds a {type(loaded).__name__}; expected a dict (a checkpoint or a state dict).")
        return loaded

    def _load_model(self, checkpoint: dict[str, Any]) -> Any:
        if checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = _align_state_dict_by_suffix(self.model.state_dict(), checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        # As Detectron2: pixel_mean/pixel_std buffers come from the config, not from old checkpoints.
        own_buffers = dict(self.model.named_buffers(recurse=False))
        for name in ("pixel_mean", "pixel_std"):
            if name in own_buffers and name in incompatible.missing_keys:
                incompatible.missing_keys.remove(name)
        return incompatible


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, numbers, strings and containers, and refuses every other global: a
    model-zoo ``.pkl`` holds only those, and refusing the rest means loading one runs no code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._source} refers to {module}.{name}; a model-zoo .pkl may only hold numpy arrays, numbers, "
            "strings and containers, so it is not loaded. Re-save the weights as a state dict with torch.save."
        )


def _load_model_zoo_pickle(f: str) -> dict[str, Any]:
    """A Detectron2 model-zoo ``.pkl`` (``{"model": {name: array}, "__author__": ...}``, with
    ``"matching_heuristics": True`` when its names need them, as Detectron2's model-zoo files have)."""
    with open(f, "rb") as stream:
        data = _ArrayUnpickler(stream, f).load()
    if not isinstance(data, dict):
        raise ValueError(f"{f} holds a {type(data).__name__}; a model-zoo .pkl holds a dict.")
    if "model" in data and "__author__" in data:
        logger.info("Reading %s, written by %s", f, data["__author__"])
        return data
    raise NotImplementedError(
        f"{f} is not in Detectron2's model-zoo format (a dict with 'model' and '__author__'; it holds "
        f"{sorted(data)[:8]}): it looks like a Caffe2 (Detectron v1) file, whose parameter names need "
        "Detectron2's Caffe2 name conversion, which samantics_d2.lite does not include. Load it with "
        "Detectron2 installed, or convert it to a state dict with Detectron2 first."
    )


def _align_state_dict_by_suffix(model_state: dict[str, Any], ckpt_state: dict[str, Any]) -> dict[str, Any]:
    """Rename the checkpoint entries after the model parameters they match.

    A model key matches a checkpoint key that equals it or is a dot-suffix of it
    (``backbone.res2.conv1.weight`` matches ``res2.conv1.weight`` and ``conv1.weight``, not
    ``1.weight``); the longest match wins. Matches of another shape are skipped (logged). Checkpoint
    entries that match nothing are kept under their own names, so the load reports them.

    Raises:
        ValueError: one checkpoint entry is the best match of two model parameters.
    """
    ckpt_keys = sorted(ckpt_state)
    result: dict[str, Any] = {}
    matched: dict[str, str] = {}  # checkpoint key -> model key
    for model_key in sorted(model_state):
        candidates = [k for k in ckpt_keys if model_key == k or model_key.endswith("." + k)]
        if not candidates:
            continue
        ckpt_key = max(candidates, key=len)
        value, wanted = ckpt_state[ckpt_key], model_state[model_key].shape
        if tuple(value.shape) != tuple(wanted):
            logger.warning(
                "Not loading %s: its shape %s in the checkpoint differs from %s of %s in the model.",
                ckpt_key, tuple(value.shape), tuple(wanted), model_key,
            )
            continue
        if ckpt_key in matched:
            raise ValueError(
                f"Checkpoint entry {ckpt_key!r} matches two model parameters, {matched[ckpt_key]!r} and "
                f"{model_key!r}; the matching heuristics cannot load it. Load without ?matching_heuristics=True, "
                "or rename the checkpoint entries after the model's parameters."
            )
        matched[ckpt_key] = model_key
        result[model_key] = value
    if not matched:
        logger.warning("No checkpoint entry matches a model parameter.")
        return ckpt_state
    logger.info("Matched %d checkpoint entries to model parameters by name suffix.", len(matched))
    result.update({k: v for k, v in ckpt_state.items() if k not in matched})
    return result
