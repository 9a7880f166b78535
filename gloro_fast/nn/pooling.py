"""Non-overlapping pooling layers with exact Lipschitz constants."""
from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.utils import _pair

from .base import LipschitzModule

__all__ = ["MaxPool2d", "AvgPool2d"]


def _check_disjoint(layer, name: str) -> None:
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
    if any(s < k for s, k in zip(stride, kernel)):
        raise ValueError(
            f"{name} must be non-overlapping (stride >= kernel_size) for a Lipschitz bound, got "
            f"kernel_size={layer.kernel_size}, stride={layer.stride}"
        )


class MaxPool2d(nn.MaxPool2d, LipschitzModule):
    """``torch.nn.MaxPool2d`` restricted to disjoint windows (stride ≥ kernel, dilation 1):
    each output reads its own window, and max is 1-Lipschitz there, so the bound is 1."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False) -> None:
        if return_indices:
            raise ValueError("return_indices must be False: the layer must return one tensor")
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        if _pair(self.dilation) != (1, 1):
            raise ValueError(f"dilation must be 1 for a non-overlapping MaxPool2d, got {dilation}")
        _check_disjoint(self, "MaxPool2d")

    def lipschitz_bound(self, n_iter: int = 0) -> float:
        return 1.0


class AvgPool2d(nn.AvgPool2d, LipschitzModule):
    """``torch.nn.AvgPool2d`` restricted to disjoint windows without padding: the mean of
    a kh×kw window has norm 1/√(kh·kw) (1/k for a square k×k window)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        if _pair(self.padding) != (0, 0) or ceil_mode or divisor_override is not None:
            raise ValueError(
                "AvgPool2d must have padding=0, ceil_mode=False and divisor_override=None for its "
                f"1/k bound, got padding={padding}, ceil_mode={ceil_mode}, divisor_override={divisor_override}"
            )
        _check_disjoint(self, "AvgPool2d")

    def lipschitz_bound(self, n_iter: int = 0) -> float:
        kh, kw = _pair(self.kernel_size)
        return 1.0 / math.sqrt(kh * kw)
