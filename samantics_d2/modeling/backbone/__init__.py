"""Image encoders as Detectron2 backbones (registered in ``BACKBONE_REGISTRY``).

All of them are :class:`EncoderBackbone`: a dense feature map and a global embedding under the names
``dense_feature`` / ``global_feature``, plus their own preprocessing (``prepare``). The upstream
packages (segment_anything, sam2, timm, open_clip) are imported when a backbone is built.
"""
from __future__ import annotations

from typing import Optional

from ..preprocess import preprocess_spec
from ..weights import get_weight_spec, load_encoder_weights
from .base import SIZES, EncoderBackbone
from .clip import CLIPBackbone
from .dinov2 import DINOv2Backbone
from .sam import HQSAMBackbone, SAMBackbone
from .sam2 import SAM2Backbone

__all__ = [
    "BACKBONE_CLASSES",
    "CLIPBackbone",
    "DINOv2Backbone",
    "EncoderBackbone",
    "HQSAMBackbone",
    "SAM2Backbone",
    "SAMBackbone",
    "SIZES",
    "build_encoder",
]

# weight family -> backbone class
BACKBONE_CLASSES: dict[str, type[EncoderBackbone]] = {
    "sam": SAMBackbone,
    "hq_sam": HQSAMBackbone,
    "sam2": SAM2Backbone,
    "dinov2": DINOv2Backbone,
    "clip": CLIPBackbone,
}


def build_encoder(
    tag: str,
    *,
    size: str = "full",
    pretrained: bool = False,
    input_size: Optional[int] = None,
    out_features: Optional[list[str]] = None,
) -> EncoderBackbone:
    """The backbone of weight tag ``tag`` with the tag's preprocessing.

    Args:
        tag: a weight tag (``"sam_vit_b"``, ``"sam2.1_hiera_l"``, ``"dinov2_vitl14_reg"``...).
        size: ``"tiny"`` builds the tiny random variant of the same family (tests, benchmarks).
        pretrained: load the tag's official weights (from ``$SAMANTICS_WEIGHTS``), strictly.
        input_size: another input size for the preprocessing (DINOv2 also stores its position
            grid at that size); None: the tag's.
        out_features: outputs to return; None: dense + global.
    """
    spec = get_weight_spec(tag)
    cls = BACKBONE_CLASSES[spec.family]
    kwargs: dict = {"variant": spec.variant, "size": size, "out_features": out_features}
    if size == "full" or input_size is not None:
        kwargs["preprocess"] = preprocess_spec(tag, input_size=input_size)
    if cls is DINOv2Backbone and input_size is not None:
        kwargs["img_size"] = input_size
    model = cls(**kwargs)
    if pretrained:
        if size != "full":
            raise ValueError(f"build_encoder({tag!r}, size={size!r}, pretrained=True): only full-size models have weights.")
        load_encoder_weights(model, tag)
    return model
