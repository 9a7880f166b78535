"""The sound test's per-sample arithmetic: the rounding allowance as linear forms, the
decision and the certified radius — one implementation for the live model
(:class:`gloro_fast.bounds.SoundBounds`) and the frozen one (:mod:`gloro_fast.export`).

Every term of the test (docs/soundness.md) is an upper bound that is a linear form, with
non-negative coefficients, of a per-sample basis N ≥ 0 ending with the constant 1 (the
activation norms of the certifying pass, or ‖x‖), plus a multiple of the radius ε. The
forms are built once per set of weights (:class:`LinearForms`, coefficients rounded up);
a batch then costs one small product N·M and a few elementwise operations, all float64.

The constants the arithmetic uses come from an accessor ``c(name, like)``:
:func:`python_constants` gives Python floats (the live model); the frozen model gives
float64 buffers expanded to ``like``'s shape, because torch's ONNX exporter would write
Python numbers as float32 and ONNX Runtime's optimiser removes multiplications by
one-element constants that look like 1 in float32 (see gloro_fast/export.py). Both give
the same IEEE results, so the frozen decisions are the live ones bit for bit. Names:
``up`` (1 + 2⁻⁵⁰), ``eta`` (the absolute term of a rounding up: 2⁻¹⁰²², the smallest
normal float64, ≥ the underflow unit 2⁻¹⁰⁷⁴ and not a slow subnormal operand), ``down``
(1 − 2⁻⁵⁰), ``ulp`` (2⁻⁵⁰), ``factor`` (the forms' product bound up(1 + γ_m)) and ``cap``
(the overflow limit of partial sums).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Union

import torch

from .rounding import FLOOR64, U64, gamma, up

__all__ = ["Allowance", "AllowanceForms", "Constants", "LinearForms", "ROUNDING", "decide", "python_constants",
           "radius", "up_signed_with", "up_with"]

Constants = Callable[[str, torch.Tensor], Union[float, torch.Tensor]]
ROUNDING: Dict[str, float] = {"up": 1.0 + 2.0 ** -50, "eta": FLOOR64, "down": 1.0 - 2.0 ** -50, "ulp": 2.0 ** -50}


def python_constants(**extra: float) -> Constants:
    """The accessor of the live model: Python floats (``ROUNDING`` and ``extra``)."""
    table = {**ROUNDING, **extra}
    return lambda name, like: table[name]


def up_with(x: torch.Tensor, c: Constants) -> torch.Tensor:
    """≥ the exact value of the last operation producing the float64 ``x`` ≥ 0:
    x·(1 + 2⁻⁵⁰) + 2⁻¹⁰²² (NaN → +inf, failing closed)."""
    x = x * c("up", x) + c("eta", x)
    return torch.where(torch.isnan(x), torch.full_like(x, math.inf), x)


def up_signed_with(x: torch.Tensor, c: Constants) -> torch.Tensor:
    """≥ the exact value of the last operation producing the float64 ``x`` (any sign)."""
    return x + (x.abs() * c("ulp", x) + c("eta", x))


@dataclass(frozen=True)
class Allowance:
    """Per-sample terms of the sound test, each affine in the radius ε (float64, (B,)):
    certified at ε iff f̃_j − f̃_i > D_ji·(s1 + ε·s1_slope) + s0 + ε·s0_slope for all i ≠ j
    and ε ≤ ``eps_max`` (beyond it the ball may overflow; −inf: x itself is not admissible)."""

    s1: torch.Tensor
    s1_slope: torch.Tensor
    s0: torch.Tensor
    s0_slope: torch.Tensor
    eps_max: torch.Tensor
    body_error: torch.Tensor       # Δ(x) ≥ ‖h̃(x) − h(x)‖ (the computed features' error)
    logit_error: torch.Tensor      # ρ(x) ≥ |f̃_i(x) − (w_iᵀh̃(x) + b_i)| (one logit's rounding)

    def refuse_unless(self, ok: torch.Tensor) -> "Allowance":
        """The same allowance, admitting nothing where ``ok`` (a bool tensor broadcasting
        to (B,)) is False."""
        return replace(self, eps_max=torch.where(ok, self.eps_max, torch.full_like(self.eps_max, -math.inf)))


class Form:
    """c·N + ε·slope for the per-sample basis N ≥ 0 (a list of non-negative coefficients,
    the last one multiplying the constant 1): the building block of :class:`LinearForms`.
    Every operation rounds its coefficients up, so a form built from upper bounds stays one."""

    __slots__ = ("coef", "slope")

    def __init__(self, coef, slope=0.0):
        self.coef, self.slope = list(coef), float(slope)

    @classmethod
    def unit(cls, size, index):
        coef = [0.0] * size
        coef[index] = 1.0
        return cls(coef)

    def __add__(self, other):
        return Form([up(a + b) for a, b in zip(self.coef, other.coef)], up(self.slope + other.slope))

    def __mul__(self, c):
        return Form([up(a * c) for a in self.coef], up(self.slope * c))

    def plus_const(self, c):
        coef = list(self.coef)
        coef[-1] = up(coef[-1] + c)
        return Form(coef, self.slope)

    def plus_slope(self, c):
        return Form(self.coef, up(self.slope + c))


# Coefficients in (0, TINY) are raised to TINY (an upper bound stays one). A coefficient that is
# zero before rounding up becomes 2⁻¹⁰⁷⁴, a subnormal, and every product with a subnormal
# operand or result takes the CPU's slow path (microcode assists on x86: measured 120 µs
# instead of 4 µs for one (1024, 12) product, 1.2 ms of a 13 ms 2C2F certify at B = 1024).
# TINY times any norm above 1e-37 stays a normal number.
TINY = 2.0 ** -900


def _no_subnormal(value: float) -> float:
    return TINY if 0.0 < value < TINY else value


@dataclass(frozen=True)
class LinearForms:
    """The sound test's terms as linear forms of a basis N (B, m): ``matrix`` (m, 4 + n)
    holds, by column, s1, s0, Δ(x), ρ(x) and n overflow limits; ``slopes`` (4 + n,) their
    coefficients of ε; ``safe_slopes`` = max(slopes, tiny) and ``has_slope`` = slopes > 0
    (precomputed, so that no runtime derives them in another precision). At radius ε every
    limit must stay ≤ ``cap``. Tensors float64 on the model's device."""

    matrix: torch.Tensor
    slopes: torch.Tensor
    safe_slopes: torch.Tensor
    has_slope: torch.Tensor
    factor: float                  # up(1 + γ_m): N·M computed in any order is within it
    cap: float

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def build(cls, s1: Form, s0: Form, body_error: Form, logit_error: Form, limits, cap: float,
              device) -> "LinearForms":
        columns = [s1, s0, body_error, logit_error] + list(limits)
        matrix = torch.tensor([[_no_subnormal(v) for v in f.coef] for f in columns],
                              dtype=torch.float64).t().contiguous()
        slopes = torch.tensor([_no_subnormal(f.slope) for f in columns], dtype=torch.float64)
        return cls(matrix.to(device), slopes.to(device),
                   slopes.clamp_min(torch.finfo(torch.float64).tiny).to(device), (slopes > 0).to(device),
                   up(1.0 + gamma(matrix.shape[0], U64)), float(cap))

    def constants(self) -> Constants:
        return python_constants(factor=self.factor, cap=self.cap)

    def evaluate(self, basis: torch.Tensor, c: Optional[Constants] = None) -> Allowance:
        """The terms for the basis (B, m) (float64, rounded up, last column 1)."""
        c = self.constants() if c is None else c
        m = self.matrix
        # an explicit left-to-right sum, so that every runtime (torch, ONNX Runtime) adds
        # in the same order and the frozen model stays bit-identical to the live one
        acc = basis[:, 0:1] * m[0]
        for k in range(1, m.shape[0]):
            acc = acc + basis[:, k:k + 1] * m[k]
        values = up_with(acc * c("factor", acc), c)
        limits = values[:, 4:]
        cap = c("cap", limits)
        room = (cap - limits) / self.safe_slopes[4:]
        room = torch.where(self.has_slope[4:], room * c("down", room), torch.full_like(room, math.inf))
        room = torch.where(limits <= cap, room, torch.full_like(room, -math.inf))
        eps_max = room.amin(dim=1)
        eps_max = torch.where(torch.isfinite(basis).all(dim=1), eps_max, torch.full_like(eps_max, -math.inf))
        s1 = values[:, 0]
        return Allowance(
            s1=s1, s1_slope=self.slopes[0].expand_as(s1), s0=values[:, 1],
            s0_slope=self.slopes[1].expand_as(s1), eps_max=eps_max, body_error=values[:, 2],
            logit_error=values[:, 3],
        )


@dataclass(frozen=True)
class AllowanceForms:
    """Both ways of bounding the rounding: ``per_sample`` (basis: the activation norms at
    each affine step, the feature norm, 1; None unless the body is a chain of layers) and
    ``a_priori`` (basis: ‖x‖, 1)."""

    per_sample: Optional[LinearForms]
    a_priori: LinearForms


def decide(logits: torch.Tensor, distances: torch.Tensor, allowance: Allowance, epsilon,
           c: Constants = python_constants()):
    """(f_⊥ in float64, certified mask, top class) at radius ``epsilon`` (a float or a
    float64 tensor broadcasting to (B,)): f_⊥ = max_{i≠j}(f̃_i + D_ji s1(ε)) + s0(ε),
    rounded up, so that f̃_j > f_⊥ is the sound test; a sample whose logits are not finite,
    whose ε exceeds ``eps_max`` or whose f_⊥ is NaN is not certified (f_⊥ = +inf)."""
    f = logits.detach().to(torch.float64)
    top = f.argmax(dim=1)
    s1 = up_with(allowance.s1 + up_with(epsilon * allowance.s1_slope, c), c)
    s0 = up_with(allowance.s0 + up_with(epsilon * allowance.s0_slope, c), c)
    d = distances.index_select(0, top)                                    # (B, C): D_ji
    rival = up_signed_with(f + up_with(d * s1.unsqueeze(1), c), c)
    own = torch.arange(f.shape[1], device=f.device) == top.unsqueeze(1)
    rival = torch.where(own, torch.full_like(rival, -math.inf), rival).amax(dim=1)
    bottom = up_signed_with(rival + s0, c)
    fj = f.gather(1, top.unsqueeze(1)).squeeze(1)
    ok = torch.isfinite(f).all(dim=1) & (allowance.eps_max >= epsilon) & ~torch.isnan(bottom)
    certified = (fj > bottom) & ok
    return torch.where(ok, bottom, torch.full_like(bottom, math.inf)), certified, top


def radius(logits: torch.Tensor, distances: torch.Tensor, allowance: Allowance,
           c: Constants = python_constants()) -> torch.Tensor:
    """The largest ε at which the sound test passes, rounded down, per sample:
    r_ji = (g_ji − D_ji s1 − s0) / (D_ji s1_slope + s0_slope), min over i ≠ j, clamped to
    [0, eps_max]; 0 where the logits are not finite."""
    f = logits.detach().to(torch.float64)
    top = f.argmax(dim=1)
    d = distances.index_select(0, top)
    gap = f.gather(1, top.unsqueeze(1)) - f                               # ≥ 0
    numer = gap * c("down", gap) - up_with(up_with(d * allowance.s1.unsqueeze(1), c)
                                           + allowance.s0.unsqueeze(1), c)
    denom = up_with(up_with(d * allowance.s1_slope.unsqueeze(1), c) + allowance.s0_slope.unsqueeze(1), c)
    ratio = torch.where(denom > 0, numer / denom,
                        torch.where(numer > 0, torch.full_like(numer, math.inf), torch.zeros_like(numer)))
    ratio = ratio * c("down", ratio)
    own = torch.arange(f.shape[1], device=f.device) == top.unsqueeze(1)
    r = torch.where(own, torch.full_like(ratio, math.inf), ratio).amin(dim=1)
    eps_max = allowance.eps_max
    r = torch.minimum(r, eps_max * c("down", eps_max)).clamp_min(0.0)
    ok = torch.isfinite(f).all(dim=1) & ~torch.isnan(r)
    return torch.where(ok, r, torch.zeros_like(r))
