"""``Backbone``, ``ShapeSpec`` and the model registries, as in ``detectron2.modeling``."""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from fvcore.common.registry import Registry

__all__ = ["BACKBONE_REGISTRY", "META_ARCH_REGISTRY", "Backbone", "ShapeSpec", "build_backbone", "build_model"]

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Registry for backbones: nn.Modules that map images to named feature maps."

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Registry for meta-architectures: whole models taking a list of dataset dicts."


@dataclass(frozen=True)
class ShapeSpec:
    """Shape of a tensor, any field may be None; ``stride`` is relative to the input image."""

    channels: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None


class Backbone(nn.Module, metaclass=ABCMeta):
    """Abstract backbone: ``forward(x: [N, C, H, W]) -> dict[name, Tensor]``.

    Subclasses set ``self._out_features`` (list of names), ``self._out_feature_channels`` and
    ``self._out_feature_strides`` (dicts by name), or override :meth:`output_shape`.
    """

    def __init__(self):
        super().__init__()

    @abstractmethod
    def forward(self, *args, **kwargs):
        pass

    @property
    def size_divisibility(self) -> int:
        """Input height and width must be a multiple of this (0: no constraint)."""
        return 0

    @property
    def padding_constraints(self) -> dict[str, int]:
        """Padding hints, e.g. ``{"size_divisibility": 14}`` or ``{"square_size": 1024}``."""
        return {}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def build_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> Backbone:
    """The backbone registered as ``cfg.MODEL.BACKBONE.NAME``, called as ``cls(cfg, input_shape)``
    (default input: ``len(cfg.MODEL.PIXEL_MEAN)`` channels)."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, input_shape)
    assert isinstance(backbone, Backbone)
    return backbone


def build_model(cfg) -> nn.Module:
    """The meta-architecture registered as ``cfg.MODEL.META_ARCHITECTURE``, called as ``cls(cfg)``
    and moved to ``cfg.MODEL.DEVICE``. It loads no weights (``DetectionCheckpointer`` does)."""
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    model.to(torch.device(cfg.MODEL.DEVICE))
    return model
