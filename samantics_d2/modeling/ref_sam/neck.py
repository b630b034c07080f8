"""A multi-scale pyramid from plain-ViT block outputs, for RefSAM's deformable DETR.

SAM's ViT keeps one stride (16) in every block. RefSAM takes the outputs of its global-attention
blocks (ViT-B blocks 2, 5, 8, 11) and turns block ``i`` into pyramid level ``i``: resampled to that
level's stride (transposed convolution to go finer, max pooling to go coarser), then projected by a
1x1 convolution and GroupNorm to the transformer's width.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["MultiLevelNeck"]


def _power_of_two(ratio: float) -> bool:
    return ratio >= 1 and float(ratio).is_integer() and (int(ratio) & (int(ratio) - 1)) == 0


class MultiLevelNeck(nn.Module):
    """From ``num_levels`` same-stride maps [B, in_channels, H, W] to ``num_levels`` maps
    [B, out_channels, H * input_stride / s, W * input_stride / s], one per stride ``s``."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int = 256,
        num_levels: int = 4,
        strides: Sequence[int] = (8, 16, 32, 64),
        input_stride: int = 16,
        num_groups: int = 32,
    ):
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if len(strides) != num_levels:
            raise ValueError(f"strides {strides} must have num_levels={num_levels} entries.")
        if out_channels % num_groups != 0:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by num_groups ({num_groups}) for GroupNorm."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.strides = strides
        self.input_stride = input_stride
        self.resample = nn.ModuleList()
        for stride in strides:
            if stride == input_stride:
                self.resample.append(nn.Identity())
            elif stride < input_stride and _power_of_two(input_stride / stride):
                factor = input_stride // stride
                self.resample.append(nn.ConvTranspose2d(in_channels, in_channels, kernel_size=factor, stride=factor))
            elif stride > input_stride and _power_of_two(stride / input_stride):
                factor = stride // input_stride
                self.resample.append(nn.MaxPool2d(kernel_size=factor, stride=factor))
            else:
                raise ValueError(
                    f"stride {stride} in {strides} is not input_stride={input_stride} times or divided by a power of 2."
                )
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1), nn.GroupNorm(num_groups, out_channels))
            for _ in strides
        )
        for projection in self.projections:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)

    def forward(self, block_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """
        Args:
            block_outputs: ``num_levels`` maps [B, in_channels, H, W] (channels first; a ViT's
                [B, H, W, C] must be permuted first), all at ``input_stride``.

        Returns:
            ``num_levels`` maps [B, out_channels, H_l, W_l], finest first.
        """
        if len(block_outputs) != len(self.strides):
            raise ValueError(
                f"MultiLevelNeck expects {len(self.strides)} block outputs (one per stride {self.strides}), "
                f"received {len(block_outputs)}."
            )
        for i, x in enumerate(block_outputs):
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(
                    f"block_outputs[{i}] has shape {tuple(x.shape)}; expected [B, {self.in_channels}, H, W] "
                    "(channels first)."
                )
        return [proj(resample(x)) for x, resample, proj in zip(block_outputs, self.resample, self.projections)]
