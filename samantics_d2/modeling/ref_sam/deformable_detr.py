"""Deformable DETR (single stage, iterative box refinement) conditioned on a class prompt.

RefSAM's detection head: multi-scale features of the target image go through deformable encoder
layers; learned queries, each with the reference's class prompt added to its content part, go
through decoder layers (self-attention, deformable cross-attention, FFN). Every decoder layer
refines the boxes of the previous one through its own box MLP (the boxes fed to the next layer are
detached) and predicts one sigmoid logit per query: "this box is an instance of the reference's
class". Pure PyTorch: deformable attention samples through ``grid_sample``.

Boxes are (cx, cy, w, h) normalised to [0, 1] by the size of the valid (unpadded) image region:
the whole map when no padding masks are given; with masks, the valid fraction of each map.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deformable_attention import MSDeformAttn

logger = logging.getLogger(__name__)

__all__ = [
    "MLP",
    "SIZE_BIAS_LAYERS",
    "DeformableDecoderLayer",
    "DeformableEncoderLayer",
    "DeformableTransformer",
    "RefDETRHead",
    "inverse_sigmoid",
    "sine_position_embedding",
]


SIZE_BIAS_LAYERS = ("first", "all")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x), with x clamped to [eps, 1 - eps] so that 0 and 1 stay finite."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def sine_position_embedding(
    mask: torch.Tensor, *, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """Sine/cosine encoding of normalised (y, x) pixel positions within the valid (unpadded) region.

    Args:
        mask: bool [B, H, W], True at padded pixels.

    Returns:
        [B, 2 * num_pos_feats, H, W]: ``num_pos_feats`` channels for y, then as many for x.
    """
    not_mask = (~mask).to(torch.float32)
    eps = 1e-6
    # Pixel centres (0.5, 1.5, ...) divided by the valid extent, then scaled to [0, scale].
    y_pos = (not_mask.cumsum(1) - 0.5) / (not_mask.sum(1, keepdim=True) + eps) * scale
    x_pos = (not_mask.cumsum(2) - 0.5) / (not_mask.sum(2, keepdim=True) + eps) * scale
    freq_index = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    frequencies = temperature ** (2 * torch.div(freq_index, 2, rounding_mode="floor") / num_pos_feats)
    encoded = []
    for pos in (y_pos, x_pos):
        phase = pos[..., None] / frequencies  # [B, H, W, F]
        # Even channels sine, odd channels cosine.
        encoded.append(torch.stack([phase[..., 0::2].sin(), phase[..., 1::2].cos()], dim=-1).flatten(3))
    return torch.cat(encoded, dim=-1).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them: [..., input_dim] -> [..., output_dim]."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _FeedForward(nn.Module):
    """Residual FFN block with post-norm: x -> norm(x + Linear(ReLU(Linear(x))))."""

    def __init__(self, *, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x))))))


class _RenameLegacyKeys:
    """``load_state_dict`` pre-hook of a layer whose layout changed: renames, in place, the keys
    ``prefix + old + rest`` to ``prefix + new + rest`` for each ``(old, new)`` of ``renames``, and logs it."""

    def __init__(self, *renames: tuple[str, str]):
        self.renames = renames

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
        renamed = 0
        for key in [k for k in state_dict if k.startswith(prefix)]:
            for old, new in self.renames:
                if key[len(prefix):].startswith(old):
                    state_dict[prefix + new + key[len(prefix) + len(old):]] = state_dict.pop(key)
                    renamed += 1
                    break
        if renamed:
            logger.info("%s %r: renamed %d keys of its earlier layout (%s).", type(module).__name__, prefix, renamed,
                        ", ".join(f"{old} -> {new}" for old, new in self.renames))


class DeformableEncoderLayer(nn.Module):
    """Deformable attention of queries over a multi-scale value sequence, then an FFN (post-norm):
    ``ffn(norm(query + dropout(attn(query + query_pos, reference_points, value))))``.

    The encoder layer (queries = values = the flattened multi-scale memory) and the second half of
    :class:`DeformableDecoderLayer` (queries = the decoder's targets, values = the encoder's memory).

    State dicts of the earlier layout (attention under ``self_attn.``) load: the keys are renamed to ``attn.``.
    """

    def __init__(self, *, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = _FeedForward(d_model=d_model, d_ffn=d_ffn, dropout=dropout)
        self._register_load_state_dict_pre_hook(_RenameLegacyKeys(("self_attn.", "attn.")), with_module=True)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        query, query_pos: [B, Q, C]; reference_points: [B, Q, L, 2 or 4]; value: [B, S, C], the
        flattened levels; padding_mask: bool [B, S], True at padded values. Returns [B, Q, C].
        """
        attended = self.attn(
            query + query_pos, reference_points, value, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm(query + self.dropout(attended)))


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (post-norm), then a :class:`DeformableEncoderLayer` block over the
    memory (deformable cross-attention, FFN).

    State dicts of the earlier layout (``cross_attn.``, ``norm2.``, ``ffn.`` directly under the layer)
    load: the keys are renamed to ``deformable.attn.``, ``deformable.norm.``, ``deformable.ffn.``.
    """

    def __init__(self, *, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.deformable = DeformableEncoderLayer(
            d_model=d_model, d_ffn=d_ffn, dropout=dropout, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        renames = (("cross_attn.", "deformable.attn."), ("norm2.", "deformable.norm."), ("ffn.", "deformable.ffn."))
        self._register_load_state_dict_pre_hook(_RenameLegacyKeys(*renames), with_module=True)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        tgt, query_pos: [B, Q, C]; reference_points: [B, Q, L, 2 or 4]; memory: [B, S, C];
        memory_padding_mask: bool [B, S]. Returns [B, Q, C].
        """
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        return self.deformable(
            tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )


def _scale_by_valid_ratios(reference: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """reference: [B, N, 2 or 4] normalised to the valid region; valid_ratios: [B, L, 2] as (w, h).
    Returns [B, N, L, 2 or 4] normalised to each level's padded map."""
    ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], dim=-1)
    return reference[:, :, None] * ratios[:, None]


class DeformableTransformer(nn.Module):
    """Deformable DETR encoder-decoder, single stage (``two_stage=False``), iterative box refinement.

    Each decoder layer owns a box MLP: its output is a correction, in logit space, of the boxes the
    layer received (the first layer receives 2-d reference points predicted from ``query_pos``; for
    them the MLP's (w, h) outputs are the initial box size).

    Args (besides the usual sizes):
        d_ffn: FFN width of the decoder layers (and of the encoder layers when ``encoder_d_ffn`` is None).
        encoder_d_ffn: FFN width of the encoder layers; the published RefSAM uses 512 (decoder 1024).
        size_bias_layers: which box MLPs start with a -2 bias on (w, h) (boxes of sigmoid(-2) ~ 0.12
            of the image side): ``"first"`` (Deformable DETR's and the published RefSAM's: only the
            first layer's, which turns reference points into boxes; later layers start from "no
            correction") or ``"all"`` (our earlier variant: every layer shrinks the boxes it receives).
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        n_heads: int = 8,
        num_encoder_layers: int = 1,
        num_decoder_layers: int = 6,
        d_ffn: int = 1024,
        encoder_d_ffn: Optional[int] = None,
        dropout: float = 0.1,
        n_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        size_bias_layers: str = "all",
    ):
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be >= 1, got {num_decoder_layers}.")
        if size_bias_layers not in SIZE_BIAS_LAYERS:
            raise ValueError(f"size_bias_layers={size_bias_layers!r} is not one of {SIZE_BIAS_LAYERS}.")
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even for the sine positional encoding, got {d_model}.")
        self.d_model = d_model
        self.n_levels = n_levels
        self.size_bias_layers = size_bias_layers
        layer_args = dict(d_model=d_model, dropout=dropout, n_levels=n_levels, n_heads=n_heads)
        encoder_d_ffn = d_ffn if encoder_d_ffn is None else encoder_d_ffn
        self.encoder_layers = nn.ModuleList(
            DeformableEncoderLayer(**layer_args, d_ffn=encoder_d_ffn, n_points=enc_n_points)
            for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DeformableDecoderLayer(**layer_args, d_ffn=d_ffn, n_points=dec_n_points) for _ in range(num_decoder_layers)
        )
        self.bbox_embed = nn.ModuleList(
            MLP(input_dim=d_model, hidden_dim=d_model, output_dim=4, num_layers=3) for _ in range(num_decoder_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in [*self.encoder_layers, *self.decoder_layers]:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        for i, mlp in enumerate(self.bbox_embed):
            # Start from "no correction"; small initial boxes (sigmoid(-2) ~ 0.12 of the image side).
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
            if i == 0 or self.size_bias_layers == "all":
                nn.init.constant_(mlp.layers[-1].bias[2:], -2.0)

    @staticmethod
    def _valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """mask: bool [B, H, W] (True = padding) -> [B, 2], the unpadded fraction as (w, h)."""
        _, height, width = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
        valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
        return torch.stack([valid_w / width, valid_h / height], dim=-1)

    @staticmethod
    def _encoder_reference_points(spatial_shapes: list[list[int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised to the valid region: [B, S, 2] as (x, y)."""
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij",
            )
            x = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
            y = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
            points.append(torch.stack([x, y], dim=-1))
        return torch.cat(points, dim=1)

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        query_content: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            srcs: L maps [B, C, H_l, W_l].
            masks: L bool maps [B, H_l, W_l], True at padding.
            pos_embeds: L maps [B, C, H_l, W_l].
            query_content: [B, Q, C], the decoder's initial target.
            query_pos: [B, Q, C], the queries' positional part (also predicts the initial reference points).

        Returns:
            hidden_states: [num_decoder_layers, B, Q, C], each decoder layer's output.
            reference_boxes: [num_decoder_layers, B, Q, 4], the (cx, cy, w, h) boxes each layer
                predicts (sigmoid space, differentiable w.r.t. that layer's box MLP).
            initial_reference: [B, Q, 2], the (x, y) points the first layer starts from.
        """
        if len(srcs) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} feature levels, received {len(srcs)}.")
        spatial_shapes_list = [list(src.shape[-2:]) for src in srcs]
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=srcs[0].device)
        level_start_index = torch.cat(
            [spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]]
        )
        memory = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], dim=1)  # [B, S, C]
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[level] for level, p in enumerate(pos_embeds)], dim=1
        )
        padding_mask = torch.cat([m.flatten(1) for m in masks], dim=1)  # [B, S]
        valid_ratios = torch.stack([self._valid_ratios(m) for m in masks], dim=1)  # [B, L, 2]

        encoder_reference = _scale_by_valid_ratios(
            self._encoder_reference_points(spatial_shapes_list, valid_ratios), valid_ratios
        )
        for layer in self.encoder_layers:
            memory = layer(memory, pos, encoder_reference, memory, spatial_shapes, level_start_index, padding_mask)

        initial_reference = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        reference = initial_reference
        output = query_content
        hidden_states, reference_boxes = [], []
        for layer, bbox_embed in zip(self.decoder_layers, self.bbox_embed):
            output = layer(
                output,
                query_pos,
                _scale_by_valid_ratios(reference, valid_ratios),
                memory,
                spatial_shapes,
                level_start_index,
                padding_mask,
            )
            delta = bbox_embed(output)
            if reference.shape[-1] == 4:
                boxes = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], dim=-1).sigmoid()
            hidden_states.append(output)
            reference_boxes.append(boxes)
            reference = boxes.detach()
        return torch.stack(hidden_states), torch.stack(reference_boxes), initial_reference


class RefDETRHead(nn.Module):
    """RefSAM's detector: Deformable DETR whose queries all carry the reference's class prompt.

    One sigmoid logit per query says whether the query's box is an instance of the reference's
    class. The prompt is added to the content part of every learned query (the positional part,
    which places the initial reference points, stays class-agnostic).

    Args:
        transformer: the Deformable DETR encoder-decoder; its ``d_model`` and ``n_levels`` are the
            head's (its width is the neck's ``out_channels``, its levels the neck's).
        num_queries: learned queries (detections per class prompt).
        prior_prob: initial probability of every query's logit (focal-loss prior).
    """

    def __init__(self, *, transformer: DeformableTransformer, num_queries: int = 300, prior_prob: float = 0.01):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}.")
        self.transformer = transformer
        self.d_model, self.n_levels = transformer.d_model, transformer.n_levels
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, 2 * self.d_model)  # (positional, content) halves
        self.class_embed = nn.ModuleList(nn.Linear(self.d_model, 1) for _ in transformer.decoder_layers)
        bias = -math.log((1.0 - prior_prob) / prior_prob)
        for linear in self.class_embed:
            nn.init.constant_(linear.bias, bias)

    def forward(
        self,
        features: list[torch.Tensor],
        prompt: torch.Tensor,
        masks: list[torch.Tensor] | None = None,
    ) -> dict:
        """
        Args:
            features: ``n_levels`` maps [B, d_model, H_l, W_l], already projected (see MultiLevelNeck).
            prompt: [B, d_model], one class prompt per image (see TokenFuser).
            masks: optional ``n_levels`` bool maps [B, H_l, W_l], True at padding; None = no padding.

        Returns:
            ``{"pred_logits": [B, Q, 1], "pred_boxes": [B, Q, 4] (cx, cy, w, h) in [0, 1],
            "aux_outputs": [{"pred_logits", "pred_boxes"} for each earlier decoder layer]}``.
        """
        if len(features) != self.n_levels:
            raise ValueError(
                f"RefDETRHead expects {self.n_levels} feature levels, received {len(features)}; "
                "build its transformer with n_levels equal to the neck's number of levels."
            )
        batch = features[0].shape[0]
        for level, feature in enumerate(features):
            if feature.dim() != 4 or feature.shape[:2] != (batch, self.d_model):
                raise ValueError(
                    f"features[{level}] has shape {tuple(feature.shape)}; expected [{batch}, {self.d_model}, H, W]."
                )
        if prompt.shape != (batch, self.d_model):
            raise ValueError(f"prompt has shape {tuple(prompt.shape)}; expected [{batch}, {self.d_model}].")
        if masks is None:
            masks = [torch.zeros((batch, *f.shape[-2:]), dtype=torch.bool, device=f.device) for f in features]
        elif len(masks) != len(features) or any(m.shape != (batch, *f.shape[-2:]) for m, f in zip(masks, features)):
            raise ValueError(
                f"masks have shapes {[tuple(m.shape) for m in masks]}; expected one bool [B, H_l, W_l] per "
                f"feature level: {[(batch, *f.shape[-2:]) for f in features]}."
            )
        pos_embeds = [
            sine_position_embedding(m, num_pos_feats=self.d_model // 2).to(f.dtype) for m, f in zip(masks, features)
        ]
        query_pos, query_content = self.query_embed.weight.split(self.d_model, dim=1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        query_content = query_content[None] + prompt[:, None]
        hidden_states, boxes, _ = self.transformer(features, masks, pos_embeds, query_content, query_pos)
        logits = [class_embed(h) for class_embed, h in zip(self.class_embed, hidden_states)]
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [
                {"pred_logits": logit, "pred_boxes": box} for logit, box in zip(logits[:-1], boxes[:-1])
            ],
        }
