"""1-Lipschitz activations."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.minmax_norm import fused_minmax_norm, minmax_norm, minmax_norm_, output_format
from ..sound.forward_error import NormBound, SumOfSquares
from .base import ConstantLipschitzModule

__all__ = ["MinMax", "ReLU", "minmax"]


def _minmax_out(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    half = a.shape[1]
    out = torch.empty_like(x)
    torch.minimum(a, b, out=out[:, :half])
    torch.maximum(a, b, out=out[:, half:])
    return out


class _MinMax(torch.autograd.Function):
    """[min(a, b), max(a, b)] of the channel halves, written straight into one output
    (torch.cat of two results reads and writes everything once more: measured 1.9× slower
    forward). The backward routes each output's gradient back to the input it came from —
    a permutation, so gradient norms are preserved (on exact ties a gets the min's gradient
    and b the max's, instead of autograd's split halves)."""

    @staticmethod
    def forward(x):
        return _minmax_out(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        a, b = x.chunk(2, dim=1)
        ctx.save_for_backward(a <= b)

    @staticmethod
    def backward(ctx, grad):
        (a_low,) = ctx.saved_tensors
        g_low, g_high = grad.chunk(2, dim=1)
        half = g_low.shape[1]
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        torch.where(a_low, g_low, g_high, out=out[:, :half])
        torch.where(a_low, g_high, g_low, out=out[:, half:])
        return out


def minmax(x: torch.Tensor) -> torch.Tensor:
    """GroupSort-2 over the channel halves of x (N, C, ...): [min(a, b), max(a, b)]."""
    if x.dim() < 2 or x.shape[1] % 2:
        raise ValueError(
            f"MinMax needs an input (N, C, ...) with an even channel count C, got {tuple(x.shape)}"
        )
    if torch.compiler.is_compiling():
        # Dynamo cannot trace out= into a slice; Inductor fuses either form into one kernel
        a, b = x.chunk(2, dim=1)
        if not (x.requires_grad and torch.is_grad_enabled()):
            # no autograd record: the eager kernel's minimum and maximum, the same bits
            # (NaN and signed zeros included), and the select form's compiled kernel was
            # 1.11x the compiled minimum/maximum at one (32, 32, 32) sample
            return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
        # with autograd: the same values and the same gradient routing as _MinMax
        low = a <= b
        return torch.cat([torch.where(low, a, b), torch.where(low, b, a)], dim=1)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _minmax_out(x)  # no autograd record: skip the mask the backward would need
    return _MinMax.apply(x)


class MinMax(ConstantLipschitzModule):
    """GroupSort with groups of 2 (MinMax): the channel dimension (dim 1) is split in two
    halves a, b and the output is [min(a, b), max(a, b)]. A permutation of its inputs on
    each pair, hence 1-Lipschitz and gradient-norm preserving. Needs an even channel count.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return minmax(x)

    def certifying_forward_norm(self, x: torch.Tensor, norm: Optional[NormBound], *, flattened_next: bool = False,
                                overwrite: bool = False):
        """MinMax permutes each sample's entries: its output norm is x's, so a known bound
        passes through; otherwise the fused kernel (where the backend has one) sums the
        squares while it writes, and the bound comes from that sum. ``flattened_next``: the
        output is flattened next (the certifying pass says so), so the fused kernel writes
        it contiguous even from a channels_last x (the flatten then copies nothing).
        ``overwrite``: x is an activation nothing else reads (the pass says so, without
        autograd), so the fused kernel may write MinMax over it (:func:`minmax_norm_`)."""
        fused = x.dim() >= 2 and x.shape[0] > 0 and fused_minmax_norm(x.device.type)
        if fused and (norm is None or flattened_next):
            # over x where the output takes x's layout (flattened next: x already contiguous)
            if overwrite and (x.is_contiguous() if flattened_next else x.is_contiguous(memory_format=output_format(x))):
                sumsq = minmax_norm_(x)
                out = x
            else:
                out, sumsq = minmax_norm(x, contiguous_out=flattened_next)
            if norm is not None:
                return out, norm
            # a bound, never differentiated: detached like activation_norm_upper's norms;
            # taken with the pass's other sums at its end (SoundBounds.per_sample_basis)
            return out, SumOfSquares(sumsq.detach(), x[0].numel())
        return self.certifying_forward(x), norm


class ReLU(nn.ReLU, ConstantLipschitzModule):
    """``torch.nn.ReLU``, 1-Lipschitz (and exact in floating point)."""

    def certifying_forward_norm(self, x: torch.Tensor, norm: Optional[NormBound]):
        """‖ReLU(x)‖ ≤ ‖x‖: a bound of x's norm bounds the output's."""
        return self.certifying_forward(x), norm
