"""``EncoderBackbone``: the interface every image encoder of the project exposes.

An encoder backbone is a Detectron2 ``Backbone`` over an upstream trunk (segment_anything, sam2,
timm, open_clip). Besides ``output_shape()``, ``size_divisibility`` and ``padding_constraints`` it
names one dense feature map and one global embedding among its outputs, and knows its own
preprocessing, so any encoder can drive the linear probe or the semantic classifier:

    feats = backbone(backbone.prepare(images))
    dense = feats[backbone.dense_feature]    # [N, C, h, w]
    vector = feats[backbone.global_feature]  # [N, D]
"""
from __future__ import annotations

import logging
from typing import ClassVar, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ...d2 import Backbone, ShapeSpec, configurable
from ...yacs_config import check_yacs_config
from ..catalog import FamilySpec, default_tag, get_family, get_weight_spec
from ..preprocess import ImageFit, PreprocessSpec, prepare_batch, preprocess_spec

__all__ = ["EncoderBackbone", "SIZES"]

logger = logging.getLogger(__name__)

SIZES = ("full", "tiny")


class EncoderBackbone(Backbone):
    """Base class of the encoder backbones.

    Attributes:
        weight_family: the family's name in :mod:`samantics_d2.modeling.catalog` (class attribute).
        variant: architecture name in the family (``"vit_b"``, ``"hiera_l"``, ``"vitg14_reg"``...).
        size: ``"full"`` (the published architecture) or ``"tiny"`` (same structure, depth 2 and
            width 32, random init, for tests).
        dense_feature: name of the ``[N, C, h, w]`` output used as dense features.
        global_feature: name of the ``[N, D]`` output used as the image embedding.
        preprocess: how images are fitted and normalised for this encoder.

    Subclasses implement :meth:`_build` (build the upstream module as ``self.encoder``, set
    ``self.img_size`` and ``self.patch_size``, call :meth:`_set_outputs`) and ``forward``.
    """

    weight_family: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    # Whether the trunk is built for one input size (``img_size``: fixed position embeddings).
    takes_img_size: ClassVar[bool] = True
    # Whether inputs must be exactly ``img_size`` square (learned position embeddings of that size).
    fixed_input_size: ClassVar[bool] = False

    @configurable
    def __init__(
        self,
        *,
        variant: Optional[str] = None,
        size: str = "full",
        img_size: Optional[int] = None,
        out_features: Optional[Sequence[str]] = None,
        preprocess: Optional[PreprocessSpec] = None,
    ) -> None:
        """Build the trunk of ``variant`` (default: the first of :attr:`variants`) at ``size``.

        Args:
            variant: architecture name in the family.
            size: ``"full"`` or ``"tiny"`` (the family's catalog ``tiny`` dims, random init).
            img_size: input size the trunk is built for (classes with ``takes_img_size`` only).
            out_features: outputs to return (default: dense + global).
            preprocess: default: the spec of the variant's weight tag at the trunk's input size.
        """
        super().__init__()
        name = type(self).__name__
        variant = self.variants[0] if variant is None else variant
        if variant not in self.variants:
            raise ValueError(f"{name} got variant={variant!r}; expected one of {self.variants}.")
        if size not in SIZES:
            raise ValueError(f"{name} got size={size!r}; expected one of {SIZES}.")
        if img_size is not None and not self.takes_img_size:
            raise ValueError(f"{name} is not built for one input size (img_size={img_size}); it takes any valid size.")
        self.variant = variant
        self.size = size
        self._preprocess = preprocess
        self._requested_features = out_features
        self.dense_feature = ""
        self.global_feature = ""
        self._build(img_size)

    def _build(self, img_size: Optional[int]) -> None:
        """Build ``self.encoder`` for :attr:`variant` / :attr:`size` and call :meth:`_set_outputs`."""
        raise NotImplementedError

    @property
    def family_spec(self) -> FamilySpec:
        """This backbone's record in :mod:`samantics_d2.modeling.catalog`."""
        return get_family(self.weight_family)

    # ------------------------------------------------------------------ construction

    @classmethod
    def options_for_tag(
        cls,
        tag: str,
        *,
        size: str = "full",
        input_size: Optional[int] = None,
        fit: Optional[str] = None,
        interpolation: Optional[str] = None,
        pre_resize: Optional[Sequence] = None,
        out_features: Optional[Sequence[str]] = None,
    ) -> dict:
        """The constructor arguments of weight tag ``tag``'s architecture and preprocessing
        (``build_encoder`` documents the options); shared by ``build_encoder`` and :meth:`from_config`."""
        spec = get_weight_spec(tag)
        if spec.family != cls.weight_family:
            raise ValueError(
                f"Weight tag {tag!r} is a {spec.family!r} encoder, not a {cls.weight_family!r} one ({cls.__name__}); "
                f"pick a {cls.weight_family} tag or the backbone class of its family."
            )
        kwargs: dict = {"variant": spec.variant, "size": size, "out_features": out_features}
        overrides = dict(input_size=input_size, fit=fit, interpolation=interpolation, pre_resize=pre_resize)
        if size == "full" or any(v is not None for v in overrides.values()):
            kwargs["preprocess"] = preprocess_spec(tag, **overrides)
        if input_size is not None and cls.takes_img_size:
            kwargs["img_size"] = input_size
        return kwargs

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None) -> dict:
        """``build_backbone(cfg)``: the architecture of ``cfg.MODEL.SAMANTICS.BACKBONE`` (yacs path,
        see :mod:`samantics_d2.yacs_config`). Weights come from ``MODEL.WEIGHTS``, as for any
        Detectron2 backbone, so ``PRETRAINED`` must be off here."""
        check_yacs_config(cfg, cls.__name__)
        node = cfg.MODEL.SAMANTICS.BACKBONE
        if node.PRETRAINED:
            raise ValueError(
                f"build_backbone builds {cls.__name__} without weights, but cfg.MODEL.SAMANTICS.BACKBONE.PRETRAINED is "
                "True. Set it to False and give the model's weights in MODEL.WEIGHTS, or load the official file with "
                "samantics_d2.modeling.weights.load_encoder_weights(backbone, path)."
            )
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(f"{cls.__name__} takes 3-channel RGB images; got input_shape={input_shape}.")
        return cls.options_for_tag(
            node.TAG, size=node.SIZE, input_size=node.INPUT_SIZE, fit=node.FIT, out_features=node.OUT_FEATURES
        )

    # ------------------------------------------------------------------ outputs

    def _default_preprocess(self, input_size: int) -> PreprocessSpec:
        tag = default_tag(self.weight_family, self.variant)
        assert tag is not None, (self.weight_family, self.variant)
        return preprocess_spec(tag, input_size=input_size)

    def _set_outputs(
        self,
        shapes: Mapping[str, ShapeSpec],
        *,
        dense_feature: str,
        global_feature: str,
        input_size: int,
    ) -> None:
        """Declare the available outputs; ``out_features`` (default: dense + global) selects them."""
        self._available = dict(shapes)
        out_features = self._requested_features
        selected = list(out_features) if out_features is not None else [dense_feature, global_feature]
        unknown = [name for name in selected if name not in self._available]
        if unknown or not selected:
            raise ValueError(
                f"{type(self).__name__} got out_features={selected}; unknown {unknown}. Available: {list(self._available)}."
            )
        self._out_features = selected
        self._out_feature_channels = {n: self._available[n].channels for n in selected}
        self._out_feature_strides = {n: self._available[n].stride for n in selected}
        self.dense_feature = dense_feature
        self.global_feature = global_feature
        if self._preprocess is None:
            self._preprocess = self._default_preprocess(input_size)
        self.preprocess: PreprocessSpec = self._preprocess

    @property
    def available_features(self) -> list[str]:
        """Every output name this backbone can produce (select with ``out_features``)."""
        return list(self._available)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``ShapeSpec`` per selected output; the global embedding has ``stride=None`` (a vector)."""
        return {name: self._available[name] for name in self._out_features}

    # ------------------------------------------------------------------ input contract

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    @property
    def square_size(self) -> int:
        """Input side the trunk requires (0: any size that satisfies ``size_divisibility``)."""
        return self.img_size if self.fixed_input_size else 0

    @property
    def padding_constraints(self) -> dict[str, int]:
        constraints = {"size_divisibility": self.size_divisibility}
        if self.square_size:
            constraints["square_size"] = self.square_size
        return constraints

    def _check_input(self, x: torch.Tensor) -> None:
        """Validate ``x: [N, 3, H, W]`` float against the trunk's constraints."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__}.forward expects normalised images [N, 3, H, W] float; got shape "
                f"{tuple(x.shape)} dtype {x.dtype}. Use backbone.prepare(images) to build it."
            )
        h, w = x.shape[-2:]
        if self.square_size and (h, w) != (self.square_size, self.square_size):
            raise ValueError(
                f"{type(self).__name__} ({self.variant}, {self.size}) needs {self.square_size}x{self.square_size} "
                f"inputs (its position embedding has a fixed size); got {h}x{w}. Use backbone.prepare(images)."
            )
        d = self.size_divisibility
        if d and (h % d or w % d):
            raise ValueError(
                f"{type(self).__name__} ({self.variant}) needs input sides divisible by {d}; got {h}x{w}. "
                "Pad or resize (backbone.prepare does it)."
            )

    # ------------------------------------------------------------------ preprocessing

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for p in self.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
        return torch.device("cpu"), torch.float32

    def prepare_with_fits(
        self, images: Sequence[Union[np.ndarray, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[ImageFit]]:
        """Like :meth:`prepare`, also returning one :class:`ImageFit` per image (to map masks,
        points and boxes back to the original images)."""
        device, dtype = self._param_device_dtype()
        if device.type == "meta":
            device = torch.device("cpu")
        return prepare_batch(images, self.preprocess, device=device, dtype=dtype)

    def prepare(self, images: Sequence[Union[np.ndarray, torch.Tensor]]) -> torch.Tensor:
        """Fit and normalise RGB images per :attr:`preprocess`.

        Args:
            images: numpy ``[H, W(, C)]`` arrays (gray, RGB, RGBA; uint8, uint16, bool or float in
                [0, 1]) or ``[3, H, W]`` uint8 RGB tensors.

        Returns:
            ``[N, 3, S, S]`` on the backbone's device, in its parameter dtype.
        """
        return self.prepare_with_fits(images)[0]

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, size={self.size!r}, out_features={self._out_features}"
