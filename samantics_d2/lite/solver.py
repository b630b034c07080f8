"""Optimizer parameter groups and learning-rate schedules, as in ``detectron2.solver``.

Schedules are fvcore ``ParamScheduler`` objects: a multiplier as a function of training progress
``where`` in [0, 1). :class:`LRMultiplier` turns one into a torch LR scheduler stepped once per
iteration.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Optional

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)
from torch import nn

__all__ = ["LRMultiplier", "WarmupParamScheduler", "get_default_optimizer_params"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    bias_lr_factor: Optional[float] = 1.0,
    weight_decay_bias: Optional[float] = None,
    lr_factor_func: Optional[Callable[[str], float]] = None,
    overrides: Optional[dict[str, dict[str, float]]] = None,
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer, with per-parameter hyper-parameters.

    Args:
        model: the model; parameters with ``requires_grad=False`` are left out, and a parameter
            shared by several modules appears once.
        base_lr, weight_decay: set in every group when given (else the optimizer's defaults apply).
        weight_decay_norm: weight decay of the parameters of normalisation layers (BatchNorm,
            GroupNorm, LayerNorm, ...).
        bias_lr_factor: learning rate of parameters named ``bias`` is ``base_lr * bias_lr_factor``.
        weight_decay_bias: weight decay of parameters named ``bias``.
        lr_factor_func: maps a full parameter name (``"backbone.blocks.0.attn.qkv.weight"``) to a
            factor of ``base_lr`` (layer-wise decay).
        overrides: ``{parameter name: {hyper-parameter: value}}``, matched on the parameter's own
            name (``"bias"``, ``"pos_embed"``, ...).

    Returns:
        A list of ``{"params": [...], **hyper-parameters}``; parameters with identical
        hyper-parameters share one group, in the order of first appearance.
    """
    overrides = copy.deepcopy(dict(overrides or {}))
    defaults: dict[str, float] = {}
    if base_lr is not None:
        defaults["lr"] = base_lr
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay
    bias_overrides: dict[str, float] = {}
    if bias_lr_factor is not None and bias_lr_factor != 1.0:
        if base_lr is None:
            raise ValueError(f"bias_lr_factor={bias_lr_factor} needs base_lr: the bias lr is base_lr * bias_lr_factor.")
        bias_overrides["lr"] = base_lr * bias_lr_factor
    if weight_decay_bias is not None:
        bias_overrides["weight_decay"] = weight_decay_bias
    if bias_overrides:
        if "bias" in overrides:
            raise ValueError(
                f"overrides['bias']={overrides['bias']} conflicts with bias_lr_factor/weight_decay_bias: use one of them."
            )
        overrides["bias"] = bias_overrides
    if lr_factor_func is not None and base_lr is None:
        raise ValueError("lr_factor_func needs base_lr: the lr of a parameter is base_lr * lr_factor_func(name).")

    groups: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            hyperparams = dict(defaults)
            if isinstance(module, _NORM_TYPES) and weight_decay_norm is not None:
                hyperparams["weight_decay"] = weight_decay_norm
            if lr_factor_func is not None:
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                hyperparams["lr"] = hyperparams["lr"] * lr_factor_func(full_name)
            hyperparams.update(overrides.get(param_name, {}))
            key = tuple(sorted(hyperparams.items()))
            groups.setdefault(key, {"params": [], **hyperparams})["params"].append(param)
    return list(groups.values())


class WarmupParamScheduler(CompositeParamScheduler):
    """``scheduler`` preceded by a warm-up over the first ``warmup_length`` fraction of training.

    The warm-up starts at ``warmup_factor * scheduler(0)`` and, for ``warmup_method="linear"``,
    rises linearly to ``scheduler(warmup_length)``; ``"constant"`` holds the start value. After the
    warm-up, ``scheduler`` is evaluated at the same ``where`` as without warm-up
    (``rescale_interval=False``) or on the remaining interval stretched to [0, 1) (True).
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
        rescale_interval: bool = False,
    ) -> None:
        if not 0.0 <= warmup_length < 1.0:
            raise ValueError(
                f"warmup_length={warmup_length} is a fraction of training and must be in [0, 1); "
                "for N warm-up iterations use N / max_iter."
            )
        end_value = scheduler(warmup_length)
        start_value = warmup_factor * scheduler(0.0)
        if warmup_method == "linear":
            warmup: ParamScheduler = LinearParamScheduler(start_value, end_value)
        elif warmup_method == "constant":
            warmup = ConstantParamScheduler(start_value)
        else:
            raise ValueError(f"warmup_method={warmup_method!r} is unknown: use 'linear' or 'constant'.")
        super().__init__(
            [warmup, scheduler],
            interval_scaling=["rescaled", "rescaled" if rescale_interval else "fixed"],
            lengths=[warmup_length, 1.0 - warmup_length],
        )


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """A torch LR scheduler whose lr is ``base_lr * multiplier(iteration / max_iter)``.

    Step it once per iteration. ``last_iter`` is the last iteration already done (-1 at the start);
    when resuming, the optimizer's param groups must hold ``initial_lr`` (they do once the
    optimizer state is loaded from a checkpoint written during training).
    Only the torch scheduler state (``base_lrs``, ``last_epoch``) is saved: fvcore schedulers are
    stateless.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        multiplier: ParamScheduler,
        max_iter: int,
        last_iter: int = -1,
    ) -> None:
        if not isinstance(multiplier, ParamScheduler):
            raise ValueError(
                f"LRMultiplier needs an fvcore ParamScheduler as multiplier, got {type(multiplier).__name__}; "
                "e.g. fvcore.common.param_scheduler.MultiStepParamScheduler."
            )
        if max_iter <= 0:
            raise ValueError(f"LRMultiplier needs max_iter > 0, got {max_iter}.")
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs, "last_epoch": self.last_epoch}

    def get_lr(self) -> list[float]:
        multiplier = self._multiplier(self.last_epoch / self._max_iter)
        return [base_lr * multiplier for base_lr in self.base_lrs]
