"""Dense layer with a power-iterated spectral-norm estimate and a provable upper bound."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import power_iteration_linear
from ..sound.dense import abs_norm_upper, spectral_norm_upper
from ..sound.forward_error import affine_layer
from ..sound.rounding import U64, gamma, up
from .base import PowerIterationModule, float64_scalar

__all__ = ["Linear"]


class Linear(nn.Linear, PowerIterationModule):
    """``torch.nn.Linear`` whose Lipschitz bound is σ̂ ≈ ‖W‖₂ by power iteration.

    y = x Wᵀ + b, x: (*, in_features) → (*, out_features). The iterate u ∈ R^{in_features}
    is the buffer ``power_iterate``. Weights are orthogonally initialised by default
    (``init="orthogonal"``; ``"default"`` keeps torch's Kaiming-uniform init).
    ``lipschitz_upper_bound()`` is a provable ‖W‖₂ bound (:mod:`gloro_fast.sound.dense`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, init: str = "orthogonal") -> None:
        if init not in ("orthogonal", "default"):
            raise ValueError(f"init must be 'orthogonal' or 'default', got {init!r}")
        self.init = init
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_iterate((in_features,), device=self.weight.device, dtype=self.weight.dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.init == "orthogonal":
            nn.init.orthogonal_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

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
        # addmm: in_features products, the bias and a margin of one rounding
        return affine_layer(bound, shape[:-1] + (self.out_features,), upper_of(self),
                            abs_norm_upper(self.weight), self.in_features, offset, arith, additions=2)
