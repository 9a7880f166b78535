"""Dense layer with a power-iterated spectral-norm estimate and a provable upper bound."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import blocked_linear, power_iteration_linear
from ..sound.dense import abs_norm_upper, spectral_norm_upper
from ..sound.forward_error import affine_layer
from ..sound.rounding import U64, gamma, up
from .base import PowerIterationModule, WeightInit, float64_scalar

__all__ = ["CERTIFYING_BLOCKS", "Linear", "certifying_blocks"]

# The certifying pass sums each dot product in this many blocks (one batched product, then
# a sum over the blocks): its worst-case rounding chain is b + k − 1 instead of n
CERTIFYING_BLOCKS = 16


def certifying_blocks(in_features: int):
    """(k, b): k blocks of b ≥ 1 inputs (k·b ≥ in_features, zero padded), or (1, n) where
    blocking would not shorten the rounding chain."""
    k = CERTIFYING_BLOCKS
    b = -(-in_features // k)
    if b + k - 1 >= in_features:
        return 1, in_features
    return k, b


class Linear(WeightInit, nn.Linear, PowerIterationModule):
    """``torch.nn.Linear`` whose Lipschitz bound is σ̂ ≈ ‖W‖₂ by power iteration.

    y = x Wᵀ + b, x: (*, in_features) → (*, out_features). The iterate u ∈ R^{in_features}
    is the buffer ``power_iterate``. Weights are orthogonally initialised by default
    (``init="orthogonal"``; ``"default"`` keeps torch's Kaiming-uniform init).
    ``lipschitz_upper_bound()`` is a provable ‖W‖₂ bound (:mod:`gloro_fast.sound.dense`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, init: str = "orthogonal") -> None:
        self._set_init(init)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_iterate((in_features,), device=self.weight.device, dtype=self.weight.dtype)

    def certifying_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same map, each dot product summed in blocks (:func:`blocked_linear`), so
        that the rounding allowance of sound certificates uses a chain of b + k − 1
        roundings instead of in_features (13.8× shorter for 1568 inputs)."""
        k, _ = certifying_blocks(self.in_features)
        if k == 1:
            return self(x)
        return blocked_linear(x, self.weight, self.bias, k)

    def _power_step(self, n_iter: int, u: torch.Tensor):
        return power_iteration_linear(self.weight, u, n_iter)

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> torch.Tensor:
        return float64_scalar(spectral_norm_upper(self.weight))

    @torch.no_grad()
    def _apply_float64(self, u: torch.Tensor):
        w = self.weight.detach().to(device="cpu", dtype=torch.float64)
        out = w @ u
        err = up(gamma(self.in_features, U64) * up(abs_norm_upper(w) * float(torch.linalg.vector_norm(u))))
        return out, err

    @torch.no_grad()
    def forward_bound(self, bound, arith, upper_of):
        shape = tuple(bound.shape)
        if not shape or shape[-1] != self.in_features:
            raise ValueError(
                f"Linear({self.in_features}, {self.out_features}) receives samples of shape "
                f"{shape}; expected (..., {self.in_features})"
            )
        positions = math.prod(shape[:-1])
        offset = 0.0
        if self.bias is not None:
            b = self.bias.detach().to(device="cpu", dtype=torch.float64)
            offset = up(float(torch.linalg.vector_norm(b)) * (1.0 + gamma(b.numel(), U64)) * math.sqrt(positions))
        # addmm: in_features products, the bias and a margin of one rounding; the
        # certifying pass's blocked sum: b products in a block, then k block sums
        k, b = certifying_blocks(self.in_features)
        return affine_layer(bound, shape[:-1] + (self.out_features,), upper_of(self),
                            abs_norm_upper(self.weight), self.in_features, offset, arith, additions=2,
                            certifying_fan_in=b + k - 1 if k > 1 else None)
