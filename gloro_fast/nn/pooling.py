"""Non-overlapping pooling layers with exact Lipschitz constants."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..sound.forward_error import affine_layer
from ..sound.rounding import down, up
from .base import ConstantLipschitzModule, float64_scalar

__all__ = ["MaxPool2d", "AvgPool2d"]


def _check_disjoint(layer, name: str) -> None:
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
    if any(s < k for s, k in zip(stride, kernel)):
        raise ValueError(
            f"{name} must be non-overlapping (stride >= kernel_size) for a Lipschitz bound, got "
            f"kernel_size={layer.kernel_size}, stride={layer.stride}"
        )


class MaxPool2d(nn.MaxPool2d, ConstantLipschitzModule):
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


class AvgPool2d(nn.AvgPool2d, ConstantLipschitzModule):
    """``torch.nn.AvgPool2d`` restricted to disjoint windows without padding: the mean of
    a kh×kw window has norm 1/√(kh·kw) (1/k for a square k×k window). Its forward rounds
    (a sum of kh·kw terms and a division), which :meth:`forward_bound` accounts for."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        if _pair(self.padding) != (0, 0) or ceil_mode or divisor_override is not None:
            raise ValueError(
                "AvgPool2d must have padding=0, ceil_mode=False and divisor_override=None for its "
                f"1/k bound, got padding={padding}, ceil_mode={ceil_mode}, divisor_override={divisor_override}"
            )
        _check_disjoint(self, "AvgPool2d")

    @property
    def lipschitz_constant_value(self) -> float:
        kh, kw = _pair(self.kernel_size)
        return 1.0 / math.sqrt(kh * kw)

    def lipschitz_upper_bound(self) -> torch.Tensor:
        kh, kw = _pair(self.kernel_size)
        return float64_scalar(up(1.0 / down(math.sqrt(kh * kw))))

    def lipschitz_lower_bound(self) -> torch.Tensor:
        kh, kw = _pair(self.kernel_size)
        return float64_scalar(down(1.0 / up(math.sqrt(kh * kw))))

    def forward_bound(self, bound, arith, upper_of):
        kh, kw = _pair(self.kernel_size)
        lip = upper_of(self)
        # |A| = A (non-negative weights): ‖|A|‖ = ‖A‖; kh·kw terms, the division and a margin
        return affine_layer(bound, self.output_shape(bound.shape), lip, lip, kh * kw, 0.0, arith,
                            additions=2)
