"""Provable upper bounds of ‖W‖₂ and ‖|W|‖₂ for a dense matrix, from its entries alone.

‖W‖₂: W is converted to float64 (exact) and scaled by a power of two 2⁻ᵉ so that
max|w_ij| ∈ [½, 1) (exact, except that entries below 2⁻¹⁰²² · 2ᵉ may lose bits to
underflow: at most 2⁻¹⁰⁷⁵ each, covered by √(mn)·2⁻¹⁰⁷⁴). The Gram matrix of the
smaller side, G = WWᵀ (m ≤ n), is computed in float64: |G̃ − G| ≤ γ_n|W||W|ᵀ entrywise,
so ‖G̃ − G‖₂ ≤ γ_n‖W‖_F² (+ m·n·2⁻¹⁰⁷⁴ for underflowing products). λ_max(G) is then
bounded by the Cholesky certificate of :mod:`gloro_fast.sound.psd`, and ‖W‖₂ ≤ √λ.
The Frobenius norm (always an upper bound) is kept if it is smaller.

‖|W|‖₂ (the entrywise absolute value, used by the forward-error analysis) is the same
certified bound applied to |W| (exact to form), capped by √(‖W‖₁‖W‖_∞), the largest
column sum times the largest row sum (Schur test).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .psd import lambda_max_upper
from .rounding import ETA64, U64, gamma, up

__all__ = ["spectral_norm_upper", "abs_norm_upper", "schur_upper", "power_of_two_scale",
           "frobenius_upper"]


def power_of_two_scale(w: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(w·2⁻ᵉ, e) with max|w·2⁻ᵉ| in [½, 1); e = 0 for a zero tensor. ``w`` float64."""
    amax = float(w.abs().max()) if w.numel() else 0.0
    if amax == 0.0 or not math.isfinite(amax):
        return w, 0
    _, e = math.frexp(amax)
    return torch.ldexp(w, torch.tensor(-e, dtype=torch.float64)), e


def frobenius_upper(w: torch.Tensor) -> float:
    """‖w‖_F rounded up (``w`` float64 with entries ≤ 1 in magnitude, or anything finite)."""
    sq = float((w * w).sum())
    return up(math.sqrt(up(sq * (1.0 + gamma(max(w.numel(), 1), U64)))))


def spectral_norm_upper(weight: torch.Tensor) -> float:
    """Provable upper bound of ‖W‖₂ for a 2-d ``weight`` (any float dtype, any device);
    +inf if it holds a non-finite value."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-d tensor, got {getattr(weight, 'shape', type(weight))}")
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if w.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(w).all()):
        return math.inf
    w, e = power_of_two_scale(w)
    if e == 0 and float(w.abs().max()) == 0.0:
        return 0.0
    if w.shape[0] > w.shape[1]:
        w = w.t()
    m, n = w.shape
    fro = frobenius_upper(w)
    fro2 = up(fro * fro)
    gram = w @ w.t()
    error = up(up(gamma(n, U64) * fro2) + m * n * ETA64)
    lam = lambda_max_upper(gram, error)
    underflow = up(math.sqrt(m * n) * ETA64)
    scaled = min(up(math.sqrt(lam)), fro) + underflow
    return up(math.ldexp(up(scaled), e))


def schur_upper(weight: torch.Tensor) -> float:
    """√(‖W‖₁‖W‖_∞) ≥ ‖|W|‖₂ (largest column sum × largest row sum, Schur test), cheap."""
    w = weight.detach().to(device="cpu", dtype=torch.float64).abs()
    if w.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(w).all()):
        return math.inf
    w, e = power_of_two_scale(w)
    col = up(float(w.sum(0).amax()) * (1.0 + gamma(w.shape[0], U64)))
    row = up(float(w.sum(1).amax()) * (1.0 + gamma(w.shape[1], U64)))
    return up(math.ldexp(up(math.sqrt(up(col * row))) + math.sqrt(w.numel()) * ETA64, e))


def abs_norm_upper(weight: torch.Tensor) -> float:
    """Provable upper bound of ‖|W|‖₂ (|W| entrywise): the certified spectral norm of |W|
    (taking |·| is exact), capped by the Schur test."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    return min(spectral_norm_upper(w.abs()), schur_upper(w))
