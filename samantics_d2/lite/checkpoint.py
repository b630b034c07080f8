"""``DetectionCheckpointer``: fvcore's ``Checkpointer`` with Detectron2's defaults.

Differences from the plain fvcore class, as in ``detectron2.checkpoint``: only the main process
writes by default; a DistributedDataParallel model is unwrapped (fvcore does this). In addition,
checkpoints and the ``last_checkpoint`` tag are written atomically (temporary file, then rename),
files are loaded on CPU with ``weights_only=True``, and a missing file is an error naming it.
"""
from __future__ import annotations

import logging
import os
import pickle
import uuid
from typing import IO, Any, Callable, Optional

import torch
from fvcore.common.checkpoint import Checkpointer
from torch import nn

from . import comm

__all__ = ["DetectionCheckpointer", "atomic_write"]

logger = logging.getLogger(__name__)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace the local file ``path`` with what ``write(binary file)`` writes.

    The data goes to a temporary file next to ``path`` that is then renamed over it, so an
    interrupted write leaves either the old file or the new one, never half a file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        if path and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise FileNotFoundError(
                    f"Checkpoint {path!r} not found. Give an existing .pth file (e.g. train.init_checkpoint=...), "
                    "or an empty path to start from the model's initial weights."
                )
            path = local
        return super().load(path, checkpointables)

    def _load_file(self, f: str) -> dict[str, Any]:
        """Read a checkpoint on CPU; a bare state dict is treated as ``{"model": state_dict}``."""
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(
                f"{f} holds Python objects that weights_only loading refuses ({e}). Checkpoints written by "
                "DetectionCheckpointer load this way; for another file you trust, re-save its state dict "
                "with torch.save(state_dict)."
            ) from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{f} holds a {type(loaded).__name__}; expected a dict (a checkpoint or a state dict).")
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded
