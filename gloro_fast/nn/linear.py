"""Dense layer with a power-iterated spectral-norm bound."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import power_iteration_linear
from .base import PowerIterationModule

__all__ = ["Linear"]


class Linear(nn.Linear, PowerIterationModule):
    """``torch.nn.Linear`` whose Lipschitz bound is σ̂ ≈ ‖W‖₂ by power iteration.

    y = x Wᵀ + b, x: (*, in_features) → (*, out_features). The iterate u ∈ R^{in_features}
    is the buffer ``power_iterate``. Weights are orthogonally initialised by default
    (``init="orthogonal"``; ``"default"`` keeps torch's Kaiming-uniform init).
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

    def _power_step(self, n_iter: int):
        return power_iteration_linear(self.weight, self.power_iterate, n_iter)
