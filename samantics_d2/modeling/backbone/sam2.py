"""SAM 2 / SAM 2.1 image encoder (``sam2``: Hiera trunk + FPN neck) as a backbone."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ...d2 import BACKBONE_REGISTRY, ShapeSpec
from .base import EncoderBackbone

__all__ = ["SAM2Backbone", "HIERA_VARIANTS"]

logger = logging.getLogger(__name__)

# Trunk arguments of sam2/configs/sam2{,.1}/sam2{,.1}_hiera_{t,s,b+,l}.yaml (SAM 2 and SAM 2.1 share
# them); the Hiera defaults apply to what is not listed.
HIERA_VARIANTS: dict[str, dict[str, Any]] = {
    "hiera_t": dict(
        embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7)
    ),
    "hiera_s": dict(
        embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)
    ),
    "hiera_b+": dict(embed_dim=112, num_heads=2),
    "hiera_l": dict(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_pos_embed_bkg_spatial_size=(7, 7),
        window_spec=(8, 4, 16, 8),
    ),
}
_NECK = dict(d_model=256, fpn_top_down_levels=(2, 3), fpn_interp_model="nearest", scalp=1, img_size=1024)


@BACKBONE_REGISTRY.register()
class SAM2Backbone(EncoderBackbone):
    """SAM 2's image encoder: ``sam2.modeling.backbones.image_encoder.ImageEncoder`` over a
    ``Hiera`` trunk and an ``FpnNeck``, built directly (no hydra).

    Outputs (``d_model`` = 256 channels each):
        ``"p2"``, ``"p3"``: strides 4 and 8, the high-resolution FPN levels SAM 2's decoder reads;
        ``"p4"``: stride 16, the image embedding (``vision_features``; dense feature);
        ``"pooled"``: ``[N, d_model]``, mean of ``"p4"`` (global feature, as in the linear probe).
    The stride-32 level is dropped, as upstream (``scalp=1``). SAM 2's predictor adds its
    ``no_mem_embed`` to ``p4`` before decoding; that parameter is part of the decoder, not of this
    backbone.

    Input: ``[N, 3, H, W]`` normalised, sides divisible by 32 (native 1024x1024; the trunk
    interpolates its position embedding to other sizes).

    Args:
        variant: ``"hiera_t"``, ``"hiera_s"``, ``"hiera_b+"`` or ``"hiera_l"``.
        size: ``"full"`` or ``"tiny"`` (5 blocks in 4 stages, width 16-128, 128 px, for tests).
        out_features: default ``["p4", "pooled"]``.
        preprocess: default: the variant's SAM 2.1 tag (stretch to 1024, ImageNet statistics).
    """

    weight_family = "sam2"
    variants = tuple(HIERA_VARIANTS)
    takes_img_size = False  # any multiple of 32, as it is

    def _build(self, img_size: Optional[int]) -> None:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine

        tiny = self.size == "tiny"  # the catalog's tiny trunk and neck
        trunk_args = self.family_spec.tiny["trunk"] if tiny else HIERA_VARIANTS[self.variant]
        neck_args = {**_NECK, **(self.family_spec.tiny["neck"] if tiny else {})}
        trunk = Hiera(**trunk_args)
        d_model = neck_args["d_model"]
        neck = FpnNeck(
            position_encoding=PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, scale=None, temperature=10000),
            d_model=d_model,
            backbone_channel_list=list(trunk.channel_list),
            fpn_top_down_levels=list(neck_args["fpn_top_down_levels"]),
            fpn_interp_model=neck_args["fpn_interp_model"],
        )
        self.encoder = ImageEncoder(trunk=trunk, neck=neck, scalp=neck_args["scalp"])
        self.img_size: int = neck_args["img_size"]
        shapes = {f"p{level}": ShapeSpec(channels=d_model, stride=2**level) for level in (2, 3, 4)}
        shapes["pooled"] = ShapeSpec(channels=d_model)
        self._set_outputs(shapes, dense_feature="p4", global_feature="pooled", input_size=self.img_size)

    @property
    def size_divisibility(self) -> int:
        # stride-32 stage, and the stride-4 grid must tile the first-stage window
        return max(32, 4 * self.encoder.trunk.window_spec[0])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [N, 3, H, W]`` normalised -> the selected outputs (see the class docstring)."""
        self._check_input(x)
        levels = self.encoder(x)["backbone_fpn"]  # [stride 4, stride 8, stride 16]
        outputs = {"p2": levels[0], "p3": levels[1], "p4": levels[2]}
        outputs["pooled"] = levels[2].mean(dim=(2, 3))
        return {name: outputs[name] for name in self._out_features}
