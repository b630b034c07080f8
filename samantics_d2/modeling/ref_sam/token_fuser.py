"""Fuse a reference instance's SAM mask-token outputs into one class prompt.

SAM's two-way transformer, prompted with a reference instance's box, returns one 256-d output per
mask token (4 for SAM, 5 for HQ-SAM, which adds its HQ token). RefSAM flattens them and maps them
through an MLP to the prompt that is added to every query of the detector.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TokenFuser"]


class TokenFuser(nn.Module):
    """[B, num_tokens, token_dim] -> [B, out_dim]: flatten, then Linear-GELU-Linear-GELU-Linear."""

    def __init__(self, *, num_tokens: int, token_dim: int = 256, hidden_dim: int = 1024, out_dim: int = 256):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1 (4 for SAM, 5 for HQ-SAM), got {num_tokens}.")
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        self.mlp = nn.Sequential(
            nn.Linear(num_tokens * token_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, num_tokens, token_dim], the mask-token outputs. Returns [B, out_dim]."""
        if tokens.dim() != 3 or tokens.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"TokenFuser expected tokens of shape [B, {self.num_tokens}, {self.token_dim}], received "
                f"{tuple(tokens.shape)}; num_tokens is 4 for SAM and 5 for HQ-SAM: build the fuser to match "
                "the model that produced the tokens."
            )
        return self.mlp(tokens.flatten(1))
