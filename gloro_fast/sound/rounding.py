"""Floating-point facts the sound bounds rest on.

Model (IEEE 754, round to nearest): for x, y in a format with unit roundoff u,
fl(x op y) = (x op y)(1 + δ) + η with |δ| ≤ u, |η| ≤ η_min (η only for products that
underflow). A dot product of n terms evaluated in *any* order with classical
arithmetic satisfies |fl(aᵀb) − aᵀb| ≤ γ_n |a|ᵀ|b| + n·η_min, γ_n = n·u / (1 − n·u)
(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1 and Lemma 3.1).

Every bound in :mod:`gloro_fast.sound` is computed in float64 and rounded *up* after
each operation with :func:`up`: for a non-negative exact value z whose float64 result is
y, |y − z| ≤ u₆₄|z| gives z ≤ y(1 + 2u₆₄) + 2⁻¹⁰⁷⁴ (the last term covers underflow),
which ``up`` over-covers with a factor 1 + 2⁻⁵⁰ = 1 + 8u₆₄.
"""
from __future__ import annotations

import math
from typing import Union

import torch

__all__ = ["U64", "ETA64", "FLOOR64", "unit_roundoff", "underflow_unit", "gamma", "up", "up_tensor", "up_tensor_inner",
           "down", "largest_finite"]

U64 = 2.0 ** -53
ETA64 = 2.0 ** -1074  # smallest positive subnormal float64
# The absolute term of the tensor roundings up: the smallest normal float64. It covers
# ETA64 (rounding is monotone, so adding more only raises the result) and, unlike ETA64,
# is not a subnormal operand: every operation with one takes the CPU's slow path (microcode
# assists on x86: measured 104 µs instead of 3.8 µs to add it to a (1024, 10) tensor).
FLOOR64 = 2.0 ** -1022
_UP = 1.0 + 2.0 ** -50
_DOWN = 1.0 - 2.0 ** -50

_UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of a floating-point dtype (half the distance from 1 to the next number)."""
    if dtype not in _UNIT_ROUNDOFF:
        raise TypeError(f"dtype must be one of {sorted(map(str, _UNIT_ROUNDOFF))}, got {dtype}")
    return _UNIT_ROUNDOFF[dtype]


def underflow_unit(dtype: torch.dtype) -> float:
    """The smallest positive subnormal of ``dtype``: an upper bound of the absolute error
    of one product that underflows (round to nearest loses at most half of it)."""
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)


def largest_finite(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def gamma(n: Union[int, float], u: float) -> float:
    """γ_n = n·u / (1 − n·u), rounded up; +inf when n·u ≥ 1/2 (no useful bound)."""
    nu = up(float(n) * u)
    if not nu < 0.5:
        return math.inf
    return up(nu / down(1.0 - nu))


def up(x: float) -> float:
    """A float64 number ≥ the exact value of the last operation that produced ``x`` ≥ 0
    (see the module docstring); NaN becomes +inf so that a failure fails closed."""
    x = float(x)
    if math.isnan(x):
        return math.inf
    return x * _UP + ETA64


def down(x: float) -> float:
    """A float64 number ≤ the exact value of the last operation that produced ``x`` ≥ 0."""
    x = float(x)
    if math.isnan(x):
        return 0.0
    return max(x * _DOWN - ETA64, 0.0)


def up_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`up` elementwise for a non-negative float64 tensor (NaN → +inf), with the
    absolute term raised to ``FLOOR64``."""
    x = up_tensor_inner(x)
    return torch.where(torch.isnan(x), torch.full_like(x, math.inf), x)


def up_tensor_inner(x: torch.Tensor) -> torch.Tensor:
    """:func:`up_tensor` without its NaN → +inf step, for a value whose every use is rounded
    up again by :func:`up_tensor` through additions and multiplications: a NaN propagates
    to that last step, which turns it into +inf, so the result is the same (two operations
    instead of five)."""
    return x * _UP + FLOOR64
