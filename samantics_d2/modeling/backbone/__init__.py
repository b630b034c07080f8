"""Image encoders as Detectron2 backbones (registered in ``BACKBONE_REGISTRY``).

All of them are :class:`EncoderBackbone`: a dense feature map and a global embedding under the names
``dense_feature`` / ``global_feature``, plus their own preprocessing (``prepare``). The upstream
packages (segment_anything, sam2, timm, open_clip) are imported when a backbone is built.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from ..catalog import FamilyView, get_weight_spec
from ..weights import load_encoder_weights, resolve_weights
from .base import SIZES, EncoderBackbone
from .clip import CLIPBackbone, CLIPConvNeXtBackbone, CLIPResNetBackbone, ConvCLIPBackbone
from .dinov2 import DINOv2Backbone
from .sam import HQSAMBackbone, SAMBackbone
from .sam2 import SAM2Backbone

__all__ = [
    "BACKBONE_CLASSES",
    "CLIPBackbone",
    "CLIPConvNeXtBackbone",
    "CLIPResNetBackbone",
    "ConvCLIPBackbone",
    "DINOv2Backbone",
    "EncoderBackbone",
    "HQSAMBackbone",
    "SAM2Backbone",
    "SAMBackbone",
    "SIZES",
    "build_encoder",
]

#: weight family -> backbone class (a live view of the catalog's ``backbone`` fields)
BACKBONE_CLASSES: Mapping[str, type[EncoderBackbone]] = FamilyView("backbone")


def build_encoder(
    tag: str,
    *,
    size: str = "full",
    pretrained: bool = False,
    weights: Optional[str] = None,
    input_size: Optional[int] = None,
    fit: Optional[str] = None,
    interpolation: Optional[str] = None,
    pre_resize: Optional[Sequence] = None,
    out_features: Optional[Sequence[str]] = None,
) -> EncoderBackbone:
    """The backbone of weight tag ``tag`` (its family's catalog ``backbone``), with the tag's
    preprocessing (and weights).

    The LazyConfig entries of ``configs/common/backbones.py`` call this. With ``pretrained=True``
    the weight file is looked up before the model is built, so an absent file fails at once.

    Args:
        tag: a weight tag (``"sam_vit_b"``, ``"sam2.1_hiera_l"``, ``"dinov2_vitl14_reg"``...).
        size: ``"tiny"`` builds the tiny random variant of the same architecture (tests, benchmarks).
        pretrained: load official weights, strictly (checksum checked where published).
        weights: another location of the weights (a path or a file name under
            ``$SAMANTICS_WEIGHTS``); default: the tag's official file name.
        input_size, fit, interpolation, pre_resize: preprocessing overrides (``preprocess_spec``). SAM, HQ-SAM and CLIP are
            built for ``input_size`` (their position embeddings have a fixed size, so official
            weights then no longer fit); DINOv2 stores its position grid at that size (official
            weights are resampled as DINOv2 does); SAM 2 takes it as it is.
        out_features: outputs to return; None: dense + global.
    """
    spec = get_weight_spec(tag)
    path = None
    if pretrained:
        if size != "full":
            raise ValueError(f"build_encoder({tag!r}, size={size!r}, pretrained=True): only size='full' has weights.")
        path = resolve_weights(weights if weights is not None else tag)
    cls = spec.family_spec.backbone_class()
    model = cls(**cls.options_for_tag(
        tag, size=size, input_size=input_size, fit=fit, interpolation=interpolation, pre_resize=pre_resize,
        out_features=out_features,
    ))
    if path is not None:
        # the published checksum applies to the published file name
        sha256 = spec.sha256 if path.name == spec.file_name else None
        load_encoder_weights(model, path, sha256=sha256)
    return model
