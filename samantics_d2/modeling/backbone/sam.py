"""SAM and HQ-SAM image encoders (``segment_anything`` / ``segment_anything_hq``) as backbones."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn

from ...d2 import BACKBONE_REGISTRY, ShapeSpec
from .base import EncoderBackbone

__all__ = ["SAMBackbone", "HQSAMBackbone", "SAM_VARIANTS"]

logger = logging.getLogger(__name__)

# segment_anything.build_sam: build_sam_vit_b / _l / _h
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
# Shared by all variants (segment_anything.build_sam._build_sam); size="tiny": the catalog's tiny dims.
_SAM_COMMON: dict[str, Any] = dict(img_size=1024, patch_size=16, mlp_ratio=4, out_chans=256, window_size=14)


@BACKBONE_REGISTRY.register()
class SAMBackbone(EncoderBackbone):
    """SAM's ViT image encoder (``segment_anything.modeling.ImageEncoderViT``).

    Outputs:
        ``"neck"``: ``[N, out_chans (256), S/16, S/16]``, stride 16: the image embedding SAM's
            decoder reads (dense feature).
        ``"pooled"``: ``[N, out_chans]``, mean of ``"neck"`` over space (global feature; the
            linear-probe embedding of "There is no SAMantics!").
        ``"block{i}"``: ``[N, embed_dim, S/16, S/16]``, output of ViT block ``i``, on request;
            :attr:`global_attn_features` names those of the global-attention blocks (RefSAM's
            multi-level input: ViT-B blocks 2, 5, 8, 11).

    Input: ``[N, 3, S, S]`` normalised, ``S = img_size`` (1024), the fixed size of SAM's absolute
    and relative position embeddings; ``prepare`` fits images as SAM does (longest side, pad).

    Args:
        variant: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``.
        size: ``"full"`` or ``"tiny"`` (depth 2, width 32, 64 px, for tests).
        img_size: input size (default 1024, tiny 64); other sizes need matching weights.
        out_features: outputs to return (default ``["neck", "pooled"]``).
        preprocess: default: the spec of the variant's weight tag at ``img_size``.
    """

    weight_family = "sam"
    variants = tuple(SAM_VARIANTS)
    fixed_input_size = True

    def _build(self, img_size: Optional[int]) -> None:
        arch = {**_SAM_COMMON, **SAM_VARIANTS[self.variant], **(self.family_spec.tiny if self.size == "tiny" else {})}
        if img_size is not None:
            arch["img_size"] = img_size
        if arch["img_size"] % arch["patch_size"]:
            raise ValueError(f"SAMBackbone img_size={arch['img_size']} must be a multiple of {arch['patch_size']}.")
        self.img_size: int = arch["img_size"]
        self.patch_size: int = arch["patch_size"]
        self.global_attn_indexes: tuple[int, ...] = tuple(arch["global_attn_indexes"])
        self.encoder = self._upstream_encoder_class()(
            img_size=arch["img_size"],
            patch_size=arch["patch_size"],
            embed_dim=arch["embed_dim"],
            depth=arch["depth"],
            num_heads=arch["num_heads"],
            mlp_ratio=arch["mlp_ratio"],
            out_chans=arch["out_chans"],
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=self.global_attn_indexes,
            window_size=arch["window_size"],
        )
        shapes = {
            "neck": ShapeSpec(channels=arch["out_chans"], stride=self.patch_size),
            "pooled": ShapeSpec(channels=arch["out_chans"]),
        }
        for i in range(arch["depth"]):
            shapes[f"block{i}"] = ShapeSpec(channels=arch["embed_dim"], stride=self.patch_size)
        self._set_outputs(shapes, dense_feature="neck", global_feature="pooled", input_size=self.img_size)

    @staticmethod
    def _upstream_encoder_class() -> type:
        from segment_anything.modeling import ImageEncoderViT

        return ImageEncoderViT

    @property
    def global_attn_features(self) -> list[str]:
        """Names of the global-attention block outputs (``block2``... for ViT-B)."""
        return [f"block{i}" for i in self.global_attn_indexes]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [N, 3, S, S]`` normalised -> the selected outputs (see the class docstring)."""
        self._check_input(x)
        wanted = set(self._out_features)
        needs_neck = bool(wanted & {"neck", "pooled"})
        block_ids = [int(name[5:]) for name in wanted if name.startswith("block")]
        last_block = len(self.encoder.blocks) - 1 if needs_neck else max(block_ids)
        outputs: dict[str, torch.Tensor] = {}
        # Same steps as ImageEncoderViT.forward, keeping the requested block outputs.
        tokens = self.encoder.patch_embed(x)  # [N, h, w, C]
        if self.encoder.pos_embed is not None:
            tokens = tokens + self.encoder.pos_embed
        for i, block in enumerate(self.encoder.blocks[: last_block + 1]):
            tokens = block(tokens)
            if f"block{i}" in wanted:
                outputs[f"block{i}"] = tokens.permute(0, 3, 1, 2)
        if needs_neck:
            neck = self.encoder.neck(tokens.permute(0, 3, 1, 2))
            if "neck" in wanted:
                outputs["neck"] = neck
            if "pooled" in wanted:
                outputs["pooled"] = neck.mean(dim=(2, 3))
        return {name: outputs[name] for name in self._out_features}


@BACKBONE_REGISTRY.register()
class HQSAMBackbone(SAMBackbone):
    """HQ-SAM's image encoder (``segment_anything_hq``): SAM's ViT, with HQ-SAM's weights.

    Same outputs as :class:`SAMBackbone`; HQ-SAM's decoder reads the first global-attention block
    output (``global_attn_features[0]``) besides ``"neck"``.
    """

    weight_family = "hq_sam"

    @staticmethod
    def _upstream_encoder_class() -> type:
        from segment_anything_hq.modeling import ImageEncoderViT

        return ImageEncoderViT
