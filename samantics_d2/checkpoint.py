"""Loading ``train.init_checkpoint`` into a model, with a check that the file is meant for it.

Detectron2's ``DetectionCheckpointer`` (and lite's, which behaves the same) loads a checkpoint
with ``strict=False`` and only warns about missing or unexpected keys, so a checkpoint of another
model loads "successfully" and a random network is trained or evaluated. ``train_net.py`` and the
tools load ``train.init_checkpoint`` through :func:`load_init_checkpoint` instead, which applies
one documented rule:

- a checkpoint that matches none of the model's parameters and buffers is an error (naming the
  file, a few of its keys and a few of the model's);
- the parts a checkpoint may leave out are the model's **frozen** parts (parameters with
  ``requires_grad=False``, and their modules' buffers): the config builds them itself, from
  official weights or a seeded random initialisation. That is how the documented partial loads
  work: a tiny SAM trained by ``PromptableSamTrainer`` (``proposer.*`` only) into the
  training-free pipeline, whose semantic encoder is frozen; a linear-probe head
  (``head.*``) into a ``LinearProbe``, whose encoder is frozen;
- when evaluating (``training=False``), a trainable parameter the file does not hold (or holds
  with another shape) is an error: it would be evaluated at its random initialisation;
- when training, such parameters start from their initialisation (fine-tuning from a backbone
  checkpoint), and wrongly-shaped keys are skipped, as Detectron2 does;
- every missing, unexpected or wrongly-shaped key is listed in one warning, grouped by module.

Resuming (``--resume``) still goes through the checkpointer: a run's own checkpoints always match.
"""
from __future__ import annotations

import logging
import os
from typing import Union

from torch import nn

from .modeling.weights import KeyMismatchError, read_state_dict

__all__ = ["load_init_checkpoint"]

logger = logging.getLogger(__name__)


def _grouped(keys: list[str], limit: int = 8) -> str:
    """``keys`` summarised by module (the first two name components), at most ``limit`` groups."""
    groups: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split(".")
        group = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[group] = groups.get(group, 0) + 1
    shown = [f"{g} ({n})" if n > 1 else g for g, n in list(groups.items())[:limit]]
    more = f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else ""
    return ", ".join(shown) + more


def load_init_checkpoint(model: nn.Module, path: Union[str, os.PathLike], *, training: bool) -> list[str]:
    """Load the model weights of checkpoint ``path`` into ``model`` (see the module docstring).

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        path: a ``.pth`` written by ``DetectionCheckpointer`` (``{"model": state_dict, ...}``) or a
            state dict file.
        training: whether the model is about to be trained (missing trainable parts allowed).

    Returns:
        The keys of ``model.state_dict()`` that were loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: the file is corrupt, truncated, refers to code, or holds no state dict.
        KeyMismatchError: the checkpoint matches none of the model's keys, or (evaluating) leaves
            trainable parameters out.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} (train.init_checkpoint) not found. Give an existing .pth file, e.g. "
            "train.init_checkpoint=output/demo/tiny_sam/model_final.pth, or an empty value to start from the "
            "model's initial weights."
        )
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    expected = model.state_dict()
    present = [k for k in expected if k in state]
    matched = [k for k in present if tuple(state[k].shape) == tuple(expected[k].shape)]
    wrong_shape = [k for k in present if tuple(state[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    name = type(model).__name__
    if not matched:
        raise KeyMismatchError(
            f"{path} ({len(state)} tensors) matches none of the {len(expected)} parameters and buffers of {name}: "
            f"it is a checkpoint of another model. Its keys: {_grouped(list(state), 5)}; the model's: "
            f"{_grouped(list(expected), 5)}. Pass a checkpoint trained with this config (train.init_checkpoint)."
        )
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    untrained = [k for k in missing + wrong_shape if k in trainable]
    lines = [f"{path}: loads {len(matched)} of the {len(expected)} tensors of {name}."]
    if missing:
        lines.append(f"  Not in the file, kept as built ({len(missing)}): {_grouped(missing)}")
    if wrong_shape:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape[:3])
        lines.append(f"  Other shape in the file, skipped ({len(wrong_shape)}): {shapes}")
    if unexpected:
        lines.append(f"  In the file but not in the model, ignored ({len(unexpected)}): {_grouped(unexpected)}")
    if untrained and not training:
        lines.append(
            f"  Of these, {len(untrained)} trainable parameters would be evaluated at their random initialisation: "
            f"{_grouped(untrained)}. Pass the checkpoint trained for this model (a partial checkpoint may only "
            "leave out frozen parts, which the config builds itself)."
        )
        raise KeyMismatchError("\n".join(lines))
    if len(lines) > 1:
        logger.warning("\n".join(lines))
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    logger.info("Loaded %d tensors into %s from %s.", len(matched), name, path)
    return matched
