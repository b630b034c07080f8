"""Multi-scale deformable attention (Deformable DETR) without compiled ops.

Each query attends to a few sampled points per head and per feature level around its reference
point; the sampled values are bilinear interpolations of the value maps, computed here with
:func:`torch.nn.functional.grid_sample` (bilinear, zero padding, ``align_corners=False``): a
sampling location ``(x, y)`` in ``[0, 1]`` normalised image coordinates falls on pixel
``(x * W - 0.5, y * H - 0.5)``, and points outside the map read zeros.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MSDeformAttn", "multi_scale_deformable_attention"]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values over levels and points, per head.

    Args:
        value: [B, S, M, D], the flattened value maps of all levels (S = sum of H_l * W_l),
            M heads of D channels each.
        spatial_shapes: int64 [L, 2], (H_l, W_l) of each level.
        level_start_index: int64 [L], where each level starts along S.
        sampling_locations: [B, Q, M, L, P, 2], (x, y) normalised to [0, 1] (values outside sample
            zero padding).
        attention_weights: [B, Q, M, L, P], usually a softmax over L * P.

    Returns:
        [B, Q, M * D].
    """
    batch, num_values, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    if sum(h * w for h, w in shapes) != num_values:
        raise ValueError(
            f"value has {num_values} positions but spatial_shapes {shapes} sum to "
            f"{sum(h * w for h, w in shapes)}; pass the shapes of the maps that were flattened into value."
        )
    # grid_sample wants [-1, 1] coordinates and one (batch x head) image per sample.
    grids = (2.0 * sampling_locations - 1.0).transpose(1, 2).flatten(0, 1)  # [B*M, Q, L, P, 2]
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # [B*M, Q, L, P]
    output = value.new_zeros(batch * num_heads, head_dim, num_queries)
    # Level by level, so that only one level's [B*M, D, Q, P] product exists at a time.
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        value_l = value[:, start : start + height * width]  # [B, H*W, M, D]
        value_l = value_l.permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        sampled = F.grid_sample(
            value_l, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [B*M, D, Q, P]
        output = output + (sampled * weights[:, None, :, level]).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Each query predicts, per head, ``n_points`` sampling offsets on each of ``n_levels`` levels and
    a softmax over those ``n_levels * n_points`` samples.
    """

    def __init__(self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}); change one of them.")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a circle of directions, one per head, point ``p`` at distance ``p + 1``;
        attention starts uniform; projections are Xavier-initialised."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [M, 2]
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values  # onto the unit square
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, 1, 1) * distances  # [M, L, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten().to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [B, Q, C] (positional embedding already added).
            reference_points: [B, Q, L, 2] normalised (x, y) points, or [B, Q, L, 4] normalised
                (cx, cy, w, h) boxes whose half size scales the offsets.
            input_flatten: [B, S, C], the flattened multi-scale maps.
            spatial_shapes: int64 [L, 2], (H_l, W_l).
            level_start_index: int64 [L].
            padding_mask: bool [B, S], True at padded positions (their values are zeroed), or None.

        Returns:
            [B, Q, C].
        """
        batch, num_queries, _ = query.shape
        num_values = input_flatten.shape[1]
        if spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(
                f"MSDeformAttn was built for n_levels={self.n_levels} but received {spatial_shapes.shape[0]} "
                "levels; build it with the number of feature levels you pass."
            )
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # [L, 2] as (W, H)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Offsets are in units of the half box size, spread over n_points.
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / self.n_points * sizes * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(reference_points.shape)}."
            )
        output = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)
