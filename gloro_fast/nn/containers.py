"""Containers and shape layers: Sequential (bound = product), Flatten (bound 1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..sound.forward_error import NormBound
from ..sound.rounding import up
from .base import ConstantLipschitzModule, LipschitzModule, float64_scalar

__all__ = ["Sequential", "Flatten"]


class Flatten(nn.Flatten, ConstantLipschitzModule):
    """``torch.nn.Flatten``: a reshape, an isometry (``start_dim`` ≥ 1: samples stay apart)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        if start_dim == 0:
            raise ValueError("Flatten must keep the batch axis: start_dim must not be 0")
        super().__init__(start_dim, end_dim)

    def certifying_forward_norm(self, x: torch.Tensor, norm: Optional[NormBound]):
        """A reshape keeps each sample's norm."""
        return self.certifying_forward(x), norm


class Sequential(nn.Sequential, LipschitzModule):
    """``torch.nn.Sequential`` of :class:`LipschitzModule` s; its bound is the product of
    theirs. A layer without a known bound is rejected at construction (use
    :func:`gloro_fast.nn.from_torch` to convert torch layers)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        for name, module in self.named_children():
            if not isinstance(module, LipschitzModule):
                raise TypeError(
                    f"Sequential: layer {name} ({type(module).__name__}) has no known Lipschitz "
                    "bound; use gloro_fast.nn layers or gloro_fast.nn.from_torch"
                )

    def append(self, module):
        if not isinstance(module, LipschitzModule):
            raise TypeError(
                f"Sequential: {type(module).__name__} has no known Lipschitz bound; use gloro_fast.nn layers"
            )
        return super().append(module)

    def lipschitz_bound(self, n_iter: int = 0):
        bound = 1.0
        for module in self:
            factor = module.lipschitz_bound(n_iter)
            # a layer whose bound is the number 1 (MinMax, Flatten, ...) adds no product,
            # hence no autograd node: the product's value and gradient are the same
            if not (isinstance(factor, (int, float)) and factor == 1):
                bound = bound * factor
        return bound

    def lipschitz_upper_bound(self) -> torch.Tensor:
        """Product of the layers' provable upper bounds (rounded up)."""
        bound = 1.0
        for module in self:
            bound = up(bound * float(module.lipschitz_upper_bound()))
        return float64_scalar(bound)

    def forward_bound(self, bound, arith, upper_of):
        for module in self:
            bound = module.forward_bound(bound, arith, upper_of)
        return bound
