"""CLIP ViT image towers (``open_clip.transformer.VisionTransformer``) as backbones."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ...d2 import BACKBONE_REGISTRY, ShapeSpec, configurable
from .base import EncoderBackbone

__all__ = ["CLIPBackbone", "CLIP_VARIANTS"]

logger = logging.getLogger(__name__)

# Vision towers of open_clip's model configs ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336
# (open_clip/model_configs/*.json): heads = width // 64, mlp_ratio 4; output_dim = embed_dim.
CLIP_VARIANTS: dict[str, dict[str, int]] = {
    "vit_b32": dict(image_size=224, patch_size=32, width=768, layers=12, output_dim=512),
    "vit_b16": dict(image_size=224, patch_size=16, width=768, layers=12, output_dim=512),
    "vit_l14": dict(image_size=224, patch_size=14, width=1024, layers=24, output_dim=768),
    "vit_l14_336": dict(image_size=336, patch_size=14, width=1024, layers=24, output_dim=768),
}


@BACKBONE_REGISTRY.register()
class CLIPBackbone(EncoderBackbone):
    """CLIP's ViT image tower.

    Outputs:
        ``"patch_tokens"``: ``[N, width, S/p, S/p]``, the patch tokens after the final LayerNorm
            (``ln_post``), not projected (dense feature);
        ``"image_embed"``: ``[N, output_dim]``, the projected image embedding that CLIP compares
            with text embeddings (global feature).

    Input: ``[N, 3, S, S]`` normalised with S = the tower's ``image_size`` (224, or 336), the size
    of its learned position embedding.

    Args:
        variant: ``"vit_b32"``, ``"vit_b16"``, ``"vit_l14"`` or ``"vit_l14_336"``.
        size: ``"full"`` or ``"tiny"`` (2 layers, width 32, 64 px, or 56 px for patch 14).
        img_size: another input size (a multiple of the patch size); the learned position
            embedding then has another shape, so official weights no longer load.
        quick_gelu: OpenAI's weights were trained with QuickGELU (default True); open_clip's
            LAION weights use GELU.
        out_features: default ``["patch_tokens", "image_embed"]``.
        preprocess: default: the variant's OpenAI tag (resize + centre crop, OpenAI statistics).
    """

    weight_family = "clip"
    variants = tuple(CLIP_VARIANTS)
    fixed_input_size = True

    @configurable
    def __init__(self, *, quick_gelu: bool = True, **kwargs: Any) -> None:
        self.quick_gelu = quick_gelu  # a plain attribute: allowed before nn.Module.__init__
        super().__init__(**kwargs)

    def _build(self, img_size: Optional[int]) -> None:
        from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

        size = self.size
        arch: dict[str, Any] = dict(CLIP_VARIANTS[self.variant])
        if size == "tiny":
            arch.update(self.family_spec.tiny)
            arch["image_size"] = 4 * arch["patch_size"] if arch["patch_size"] < 32 else 2 * arch["patch_size"]
        if img_size is not None:
            if img_size % arch["patch_size"]:
                raise ValueError(f"CLIPBackbone img_size={img_size} must be a multiple of the patch size {arch['patch_size']}.")
            arch["image_size"] = img_size
        heads = max(2, arch["width"] // 64) if size == "tiny" else arch["width"] // 64
        self.encoder = VisionTransformer(
            image_size=arch["image_size"],
            patch_size=arch["patch_size"],
            width=arch["width"],
            layers=arch["layers"],
            heads=heads,
            mlp_ratio=4.0,
            output_dim=arch["output_dim"],
            act_layer=QuickGELU if self.quick_gelu else torch.nn.GELU,
            norm_layer=LayerNorm,
            output_tokens=True,
        )
        self.img_size: int = arch["image_size"]
        self.patch_size: int = arch["patch_size"]
        shapes = {
            "patch_tokens": ShapeSpec(channels=arch["width"], stride=self.patch_size),
            "image_embed": ShapeSpec(channels=arch["output_dim"]),
        }
        self._set_outputs(shapes, dense_feature="patch_tokens", global_feature="image_embed", input_size=self.img_size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [N, 3, S, S]`` normalised -> the selected outputs (see the class docstring)."""
        self._check_input(x)
        pooled, tokens = self.encoder(x)  # [N, output_dim], [N, h*w, width] (output_tokens=True)
        n, _, h, w = x.shape
        grid = tokens.transpose(1, 2).reshape(n, tokens.shape[-1], h // self.patch_size, w // self.patch_size)
        outputs = {"patch_tokens": grid, "image_embed": pooled}
        return {name: outputs[name] for name in self._out_features}
