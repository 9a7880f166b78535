"""1-Lipschitz activations."""
from __future__ import annotations

import torch
from torch import nn

from .base import ConstantLipschitzModule

__all__ = ["MinMax", "ReLU"]


class MinMax(ConstantLipschitzModule):
    """GroupSort with groups of 2 (MinMax): the channel dimension (dim 1) is split in two
    halves a, b and the output is [min(a, b), max(a, b)]. A permutation of its inputs on
    each pair, hence 1-Lipschitz and gradient-norm preserving. Needs an even channel count.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % 2:
            raise ValueError(
                f"MinMax needs an input (N, C, ...) with an even channel count C, got {tuple(x.shape)}"
            )
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


class ReLU(nn.ReLU, ConstantLipschitzModule):
    """``torch.nn.ReLU``, 1-Lipschitz (and exact in floating point)."""
