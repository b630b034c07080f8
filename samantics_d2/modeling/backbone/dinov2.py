"""DINOv2 ViTs (timm's ``vit_*_patch14{,_reg4}_dinov2``) as backbones."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ...d2 import BACKBONE_REGISTRY, ShapeSpec
from .base import EncoderBackbone

__all__ = ["DINOv2Backbone", "DINOV2_VARIANTS"]

logger = logging.getLogger(__name__)

# variant -> (timm model name, embed_dim, SwiGLU FFN). The "_reg" variants have 4 register tokens.
_ARCHS = (("vits14", "small", 384), ("vitb14", "base", 768), ("vitl14", "large", 1024), ("vitg14", "giant", 1536))
DINOV2_VARIANTS: dict[str, tuple[str, int, bool]] = {
    arch + reg: (f"vit_{timm_size}_patch14{timm_reg}_dinov2", dim, arch == "vitg14")
    for arch, timm_size, dim in _ARCHS
    for reg, timm_reg in (("", ""), ("_reg", "_reg4"))
}


def swiglu_hidden(embed_dim: int) -> int:
    """Hidden width of DINOv2's fused SwiGLU FFN (``SwiGLUFFNFused``, mlp_ratio 4)."""
    return (int(embed_dim * 4 * 2 / 3) + 7) // 8 * 8


@BACKBONE_REGISTRY.register()
class DINOv2Backbone(EncoderBackbone):
    """DINOv2 ViT-S/B/L/g (patch 14), with or without registers, over timm's ``VisionTransformer``.

    Outputs:
        ``"patch_tokens"``: ``[N, embed_dim, H/14, W/14]``, the normalised patch tokens (dense feature);
        ``"cls_token"``: ``[N, embed_dim]``, the normalised class token (global feature).

    Input: ``[N, 3, H, W]`` normalised, sides divisible by 14. The position embedding is stored
    for ``img_size``; loading official weights resamples it with DINOv2's own interpolation, so at
    ``img_size`` the outputs equal the torch-hub model's. Other sizes work too (timm resamples the
    stored embedding on the fly, antialiased bicubic).

    Args:
        variant: ``"vits14"``, ``"vitb14"``, ``"vitl14"``, ``"vitg14"``, or one of them + ``"_reg"``.
        size: ``"full"`` or ``"tiny"`` (depth 2, width 32, 56 px; keeps registers and SwiGLU).
        img_size: size of the stored position grid (default: the preprocessing input size, 224;
            518 for DINOv2's own grid).
        out_features: default ``["patch_tokens", "cls_token"]``.
        preprocess: default: the variant's tag (resize 256 + centre crop 224) at ``img_size``.
    """

    weight_family = "dinov2"
    variants = tuple(DINOV2_VARIANTS)

    def _build(self, img_size: Optional[int]) -> None:
        import timm

        timm_name, embed_dim, swiglu = DINOV2_VARIANTS[self.variant]
        tiny = self.family_spec.tiny
        overrides: dict[str, Any] = {}
        if self.size == "tiny":
            embed_dim = tiny["embed_dim"]
            overrides.update(embed_dim=embed_dim, depth=tiny["depth"], num_heads=tiny["num_heads"])
        if swiglu:
            # timm packs SwiGLU's two input projections in one fc1 of width 2 * hidden; the +0.5
            # keeps int(embed_dim * mlp_ratio) exact.
            overrides["mlp_ratio"] = (2 * swiglu_hidden(embed_dim) + 0.5) / embed_dim
        if img_size is None:
            preprocess = self._preprocess
            img_size = preprocess.input_size if preprocess is not None else (tiny["img_size"] if self.size == "tiny" else 224)
        if img_size % 14:
            raise ValueError(f"DINOv2Backbone img_size={img_size} must be a multiple of the patch size 14.")
        self.img_size = img_size
        self.encoder = timm.create_model(
            timm_name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True, **overrides
        )
        self.patch_size = 14
        shapes = {
            "patch_tokens": ShapeSpec(channels=embed_dim, stride=self.patch_size),
            "cls_token": ShapeSpec(channels=embed_dim),
        }
        self._set_outputs(shapes, dense_feature="patch_tokens", global_feature="cls_token", input_size=img_size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [N, 3, H, W]`` normalised -> the selected outputs (see the class docstring)."""
        self._check_input(x)
        tokens = self.encoder.forward_features(x)  # [N, prefix + h*w, C], final norm applied
        n, _, h, w = x.shape
        patches = tokens[:, self.encoder.num_prefix_tokens :]
        grid = patches.transpose(1, 2).reshape(n, patches.shape[-1], h // self.patch_size, w // self.patch_size)
        outputs = {"patch_tokens": grid, "cls_token": tokens[:, 0]}
        return {name: outputs[name] for name in self._out_features}
