"""Containers and shape layers: Sequential (bound = product), Flatten (bound 1)."""
from __future__ import annotations

from torch import nn

from .base import LipschitzModule

__all__ = ["Sequential", "Flatten"]


class Flatten(nn.Flatten, LipschitzModule):
    """``torch.nn.Flatten``: a reshape, an isometry."""

    def lipschitz_bound(self, n_iter: int = 0) -> float:
        return 1.0


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
            bound = bound * module.lipschitz_bound(n_iter)
        return bound
