"""CLIP image towers as backbones: ViT (``open_clip.transformer.VisionTransformer``) and the
convolutional towers used for mask pooling (open_clip ConvNeXt via timm, OpenAI ModifiedResNet)."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ...d2 import BACKBONE_REGISTRY, ShapeSpec, configurable
from .base import EncoderBackbone

__all__ = [
    "CLIPBackbone",
    "CLIPConvNeXtBackbone",
    "CLIPResNetBackbone",
    "CLIP_CONVNEXT_VARIANTS",
    "CLIP_EMBED_DIMS",
    "CLIP_RESNET_VARIANTS",
    "CLIP_VARIANTS",
    "ConvCLIPBackbone",
]

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


# ----------------------------------------------------------------------------- convolutional CLIP towers

# open_clip model config convnext_large_d_320.json: a timm ``convnext_large`` trunk (its classifier
# reset: avg pool + LayerNorm2d stay as ``trunk.head``), an MLP projection head (``timm_proj="mlp"``,
# hidden 2 x embed_dim, no bias on the last layer), 320 px; LAION weights (GELU text tower).
CLIP_CONVNEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "convnext_large_d_320": dict(timm_model="convnext_large", image_size=320, output_dim=768),
}
# open_clip model config RN50x16.json (OpenAI's CLIP RN50x16): ModifiedResNet, 384 px, attention pool
# with heads = width * 32 // 64.
CLIP_RESNET_VARIANTS: dict[str, dict[str, Any]] = {
    "rn50x16": dict(layers=(6, 8, 18, 8), width=96, image_size=384, output_dim=768),
}
#: every CLIP image tower's embedding size (the joint image-text space), ViT and convolutional
CLIP_EMBED_DIMS: dict[str, int] = {
    name: arch["output_dim"]
    for table in (CLIP_VARIANTS, CLIP_CONVNEXT_VARIANTS, CLIP_RESNET_VARIANTS)
    for name, arch in table.items()
}


class ConvCLIPBackbone(EncoderBackbone):
    """Base of the convolutional CLIP image towers (open_clip ConvNeXt and ModifiedResNet).

    Outputs:
        ``"feature_map"``: ``[N, C, H/32, W/32]``, the last stage's dense feature map (the input of
            CLIP's pooling head);
        ``"image_embed"``: ``[N, output_dim]``, CLIP's image embedding (``encode_image``).

    Any input size divisible by 32 is taken (the trunk is convolutional; the ResNet's attention-pool
    position embedding is resampled to the grid). :meth:`embed_masks` applies CLIP's own head to
    mask-pooled features, so a mask covering the whole map gives ``image_embed``.
    """

    takes_img_size = False  # convolutional: any size; the native size only sets the preprocessing
    stride = 32

    def _set_conv_outputs(self, *, channels: int, output_dim: int, image_size: int) -> None:
        self.img_size, self.patch_size = image_size, self.stride
        self.output_dim = output_dim
        shapes = {
            "feature_map": ShapeSpec(channels=channels, stride=self.stride),
            "image_embed": ShapeSpec(channels=output_dim),
        }
        self._set_outputs(shapes, dense_feature="feature_map", global_feature="image_embed", input_size=image_size)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, 3, H, W]`` normalised -> ``[N, C, H/32, W/32]``."""
        raise NotImplementedError

    def embed_masks(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """CLIP's head applied to each mask of each image, batched.

        Args:
            features: ``[N, C, h, w]`` from :meth:`feature_map`.
            weights: ``[N, P, h, w]`` >= 0: ``P`` masks per image on the feature grid (the share
                of each cell the mask covers). A mask of all ones gives ``image_embed``.

        Returns:
            ``[N, P, output_dim]`` embeddings, not normalised (an all-zero mask gets a finite,
            meaningless embedding).
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [N, 3, H, W]`` normalised -> the selected outputs (see the class docstring)."""
        self._check_input(x)
        features = self.feature_map(x)
        outputs = {"feature_map": features}
        if "image_embed" in self._out_features:
            ones = features.new_ones((features.shape[0], 1, *features.shape[-2:]))
            outputs["image_embed"] = self.embed_masks(features, ones)[:, 0]
        return {name: outputs[name] for name in self._out_features}


@BACKBONE_REGISTRY.register()
class CLIPConvNeXtBackbone(ConvCLIPBackbone):
    """open_clip's ConvNeXt CLIP image tower (``TimmModel``: a timm ConvNeXt trunk + projection head).

    ``image_embed`` is ``head(trunk.forward_head(feature_map))``: average pool, LayerNorm, MLP
    projection, as open_clip's ``encode_image``. :meth:`embed_masks` replaces the average pool by
    the mask-weighted mean (:func:`~samantics_d2.modeling.semantic.mask_ops.mask_pooling`) and
    applies the same LayerNorm and projection (FC-CLIP's and OVSAM's mask pooling of a ConvNeXt CLIP).

    Args:
        variant: ``"convnext_large_d_320"``.
        size: ``"full"`` or ``"tiny"`` (depths 1-1-1-1, widths 16-16-32-32, output 32).
    """

    weight_family = "clip_convnext"
    variants = tuple(CLIP_CONVNEXT_VARIANTS)

    def _build(self, img_size: Optional[int]) -> None:
        import timm
        from timm.layers import Mlp

        arch = dict(CLIP_CONVNEXT_VARIANTS[self.variant])
        overrides: dict[str, Any] = {}
        if self.size == "tiny":
            tiny = dict(self.family_spec.tiny)
            arch.update(output_dim=tiny["output_dim"], image_size=tiny["image_size"])
            overrides = dict(depths=tiny["depths"], dims=tiny["dims"])
        trunk = timm.create_model(arch["timm_model"], pretrained=False, **overrides)
        trunk.reset_classifier(0)  # open_clip (timm_pool=""): keeps the avg pool and norm, drops the classifier
        embed = arch["output_dim"]
        head = torch.nn.Sequential()
        head.add_module("mlp", Mlp(trunk.num_features, 2 * embed, embed, drop=(0.0, 0.0), bias=(True, False)))
        self.encoder = torch.nn.Module()
        self.encoder.trunk, self.encoder.head = trunk, head
        self._set_conv_outputs(channels=trunk.num_features, output_dim=embed, image_size=arch["image_size"])

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.trunk.forward_features(x)

    def embed_masks(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from ..semantic.mask_ops import mask_pooling

        pooled, _ = mask_pooling(features, weights)  # [N, P, C]
        n, p, c = pooled.shape
        # forward_head on a 1x1 map: its average pool is the identity, then LayerNorm2d (+ flatten)
        head_in = self.encoder.trunk.forward_head(pooled.reshape(n * p, c, 1, 1))
        return self.encoder.head(head_in).reshape(n, p, -1)


@BACKBONE_REGISTRY.register()
class CLIPResNetBackbone(ConvCLIPBackbone):
    """OpenAI's ModifiedResNet CLIP image tower (open_clip ``ModifiedResNet``: 3-conv stem, antialiased
    bottlenecks, QKV attention pool).

    ``image_embed`` is open_clip's ``attnpool``: the mean token (plus its position) attends to itself
    and every grid token (plus theirs), then ``c_proj``. :meth:`embed_masks` is the same attention
    with the mask's weighted mean as the query token and the mask as an additive ``log(weight)``
    bias on the grid tokens (outside: excluded; soft weights: down-weighted), so a full mask gives
    ``attnpool`` exactly. On another grid than the native one the position embedding is resampled
    (bicubic).

    Args:
        variant: ``"rn50x16"``.
        size: ``"full"`` or ``"tiny"`` (1-1-1-1 bottlenecks, width 8, output 32, 64 px).
    """

    weight_family = "clip_resnet"
    variants = tuple(CLIP_RESNET_VARIANTS)

    def _build(self, img_size: Optional[int]) -> None:
        from open_clip.modified_resnet import ModifiedResNet

        arch = dict(CLIP_RESNET_VARIANTS[self.variant])
        if self.size == "tiny":
            arch.update(self.family_spec.tiny)
        channels = arch["width"] * 32
        self.encoder = ModifiedResNet(
            layers=list(arch["layers"]),
            output_dim=arch["output_dim"],
            heads=channels // 64,
            image_size=arch["image_size"],
            width=arch["width"],
        )
        self._set_conv_outputs(channels=channels, output_dim=arch["output_dim"], image_size=arch["image_size"])

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        return e.layer4(e.layer3(e.layer2(e.layer1(e.stem(x)))))

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """``[1 + h*w, C]``: the attention pool's position embedding on an ``h x w`` grid."""
        pos = self.encoder.attnpool.positional_embedding
        side = self.img_size // self.stride
        if (h, w) == (side, side):
            return pos
        grid = pos[1:].T.reshape(1, -1, side, side)
        grid = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.reshape(pos.shape[1], h * w).T])

    def embed_masks(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from ..semantic.mask_ops import mask_pooling

        pool = self.encoder.attnpool
        n, c, h, w = features.shape
        heads = pool.num_heads
        pos = self._position_embedding(h, w).to(features.dtype)  # [1 + hw, C]
        tokens = features.flatten(2).transpose(1, 2) + pos[1:]  # [N, hw, C]
        query_in = mask_pooling(features, weights)[0] + pos[0]  # [N, P, C]: the mask's mean token
        p = query_in.shape[1]
        linear = torch.nn.functional.linear
        q = linear(query_in, pool.q_proj.weight, pool.q_proj.bias).reshape(n, p, heads, -1)
        k_self = linear(query_in, pool.k_proj.weight, pool.k_proj.bias).reshape(n, p, heads, -1)
        v_self = linear(query_in, pool.v_proj.weight, pool.v_proj.bias).reshape(n, p, heads, -1)
        k = linear(tokens, pool.k_proj.weight, pool.k_proj.bias).reshape(n, h * w, heads, -1)
        v = linear(tokens, pool.v_proj.weight, pool.v_proj.bias).reshape(n, h * w, heads, -1)
        q = q * q.shape[-1] ** -0.5
        bias = torch.log(weights.flatten(2).to(features.dtype))  # [N, P, hw]: -inf outside the mask
        logits_grid = torch.einsum("nphd,nlhd->nphl", q, k) + bias[:, :, None, :]  # [N, P, heads, hw]
        logits_self = (q * k_self).sum(-1, keepdim=True)  # [N, P, heads, 1]
        attention = torch.cat([logits_self, logits_grid], dim=-1).softmax(dim=-1)
        out = attention[..., :1] * v_self + torch.einsum("nphl,nlhd->nphd", attention[..., 1:], v)
        return pool.c_proj(out.reshape(n, p, c))
