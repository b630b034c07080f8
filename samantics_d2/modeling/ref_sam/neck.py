"""A multi-scale pyramid from plain-ViT block outputs, for RefSAM's deformable DETR.

SAM's ViT keeps one stride (16) in every block. RefSAM takes the outputs of its global-attention
blocks (ViT-B blocks 2, 5, 8, 11) and turns block ``i`` into level ``i``: a 1x1 convolution and
GroupNorm to the transformer's width. As published (``strides=None``) every level keeps the block's
own stride (four 64 x 64 maps for a 1024 px input: 16,384 memory positions); our multi-stride variant
(``strides=(8, 16, 32, 64)``) first resamples block ``i`` to that level's stride (transposed
convolution to go finer, max pooling to go coarser: 21,760 positions, and the transposed
convolution's weights). The neck is sized from the backbone's
``output_shape()`` of those blocks (channels and stride), as ViTDet's ``SimpleFeaturePyramid`` is.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ...d2 import ShapeSpec

__all__ = ["MultiLevelNeck"]


def _power_of_two(ratio: float) -> bool:
    return ratio >= 1 and float(ratio).is_integer() and (int(ratio) & (int(ratio) - 1)) == 0


def _resampling(channels: int, input_stride: int, stride: int, strides: Sequence[int]) -> nn.Module:
    """The layer that takes a ``[B, channels, H, W]`` map at ``input_stride`` to ``stride``."""
    if stride == input_stride:
        return nn.Identity()
    if stride < input_stride and _power_of_two(input_stride / stride):
        factor = input_stride // stride
        return nn.ConvTranspose2d(channels, channels, kernel_size=factor, stride=factor)
    if stride > input_stride and _power_of_two(stride / input_stride):
        factor = stride // input_stride
        return nn.MaxPool2d(kernel_size=factor, stride=factor)
    raise ValueError(
        f"stride {stride} in {tuple(strides)} is not input_stride={input_stride} times or divided by a power of 2."
    )


class MultiLevelNeck(nn.Module):
    """From one map ``[B, C_l, H, W]`` per input shape (at its stride ``s_in``) to one map
    ``[B, out_channels, H * s_in / s_l, W * s_in / s_l]`` per level stride ``s_l``.

    Args:
        input_shapes: ``ShapeSpec(channels, stride)`` of each level's input, e.g.
            ``[backbone.output_shape()[name] for name in feature_names]``.
        out_channels: width of every level (the transformer's ``d_model``).
        strides: the output stride of each level (one per input shape); None: each input's own
            stride, no resampling (the published neck).
        num_groups: GroupNorm groups (``out_channels`` must be divisible by it).
    """

    def __init__(
        self,
        *,
        input_shapes: Sequence[ShapeSpec],
        out_channels: int = 256,
        strides: Optional[Sequence[int]] = (8, 16, 32, 64),
        num_groups: int = 32,
    ):
        super().__init__()
        if strides is None:
            strides = [shape.stride for shape in input_shapes]
        strides = tuple(int(s) for s in strides)
        if len(strides) != len(input_shapes):
            raise ValueError(
                f"MultiLevelNeck got {len(input_shapes)} input shapes and strides {strides}: give one stride per input."
            )
        if out_channels % num_groups != 0:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by num_groups ({num_groups}) for GroupNorm."
            )
        self.in_channels = tuple(int(shape.channels) for shape in input_shapes)
        self.out_channels, self.strides = out_channels, strides
        self.resample = nn.ModuleList(
            _resampling(shape.channels, shape.stride, stride, strides) for shape, stride in zip(input_shapes, strides)
        )
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, out_channels, kernel_size=1), nn.GroupNorm(num_groups, out_channels))
            for channels in self.in_channels
        )
        for projection in self.projections:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)

    def forward(self, block_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """
        Args:
            block_outputs: one map ``[B, C_l, H, W]`` per input shape (channels first; a ViT's
                ``[B, H, W, C]`` must be permuted first), each at its input stride.

        Returns:
            one map ``[B, out_channels, H_l, W_l]`` per level, finest first.
        """
        if len(block_outputs) != len(self.strides):
            raise ValueError(
                f"MultiLevelNeck expects {len(self.strides)} block outputs (one per stride {self.strides}), "
                f"received {len(block_outputs)}."
            )
        for i, (x, channels) in enumerate(zip(block_outputs, self.in_channels)):
            if x.dim() != 4 or x.shape[1] != channels:
                raise ValueError(
                    f"block_outputs[{i}] has shape {tuple(x.shape)}; expected [B, {channels}, H, W] (channels first)."
                )
        return [proj(resample(x)) for x, resample, proj in zip(block_outputs, self.resample, self.projections)]
