"""``sound_decision(logits, distances, basis, matrix, slopes, safe_slopes, has_slope, factor,
cap, epsilon)``: the sound test of a batch, from the per-sample basis of its rounding
allowance to the decision, in one call.

For logits f (B, C) (any float dtype, taken exactly in float64), D (C, C) float64
(D_ji ≥ ‖w_j − w_i‖), the basis N (B, m) float64 (activation norms rounded up, last column
1) and the linear forms of :class:`gloro_fast.sound.decision.LinearForms` (``matrix``
(m, 4 + n), ``slopes``, ``safe_slopes`` (4 + n,) float64, ``has_slope`` (4 + n,) bool,
``factor`` = up(1 + γ_m), ``cap``), it returns what

    decide(f, D, LinearForms(...).evaluate(N), ε)

returns — (f_⊥ (B,) float64, certified (B,) bool, top class (B,) int64) — bit for bit:
the same IEEE float64 operations in the same order (docs/soundness.md, "Evaluation").

Why an op: the reference is some eighty small float64 tensor operations (the forms'
left-to-right sum, each rounding up, the overflow limits, the rivals); in eager mode each
costs a dispatch and a pass over (B, C) or (B, 4 + n) values, 0.6 ms of a 14 ms 2C2F
certify at B = 1024 on 2 cores. The C++ CPU kernel (csrc/cpu/sound_decision.cpp) makes one
pass per sample. The frozen and exported models keep the reference (plain torch ops, which
ONNX Runtime runs): the kernel must give its bits, and the tests compare them.

No autograd (the test is a decision: its inputs are detached) and no backward op; a fake
kernel gives torch.compile the output shapes.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._validation import check_tensor
from ..sound.decision import LinearForms, decide
from ._library import define_inference_op

__all__ = ["sound_decision", "sound_decision_reference"]

SCHEMA = ("(Tensor logits, Tensor distances, Tensor basis, Tensor matrix, Tensor slopes, Tensor safe_slopes, "
          "Tensor has_slope, float factor, float cap, float epsilon) -> (Tensor, Tensor, Tensor)")


def sound_decision_reference(logits, distances, basis, matrix, slopes, safe_slopes, has_slope, factor, cap,
                             epsilon) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The computation in torch ops: :meth:`LinearForms.evaluate` then :func:`decide`
    (what the frozen model runs)."""
    forms = LinearForms(matrix, slopes, safe_slopes, has_slope, float(factor), float(cap))
    return decide(logits, distances, forms.evaluate(basis), float(epsilon))


def _fake(logits, distances, basis, matrix, slopes, safe_slopes, has_slope, factor, cap, epsilon):
    b = logits.shape[0]
    return (logits.new_empty((b,), dtype=torch.float64), logits.new_empty((b,), dtype=torch.bool),
            logits.new_empty((b,), dtype=torch.int64))


def _check(logits, distances, basis, matrix, slopes, safe_slopes, has_slope) -> None:
    check_tensor("logits", logits, ndim=2, floating=True)
    b, c = logits.shape
    for name, t, shape in (("distances", distances, (c, c)), ("basis", basis, (b, matrix.shape[0])),
                           ("slopes", slopes, (matrix.shape[1],)), ("safe_slopes", safe_slopes, (matrix.shape[1],))):
        if tuple(t.shape) != shape or t.dtype != torch.float64:
            raise ValueError(f"{name} must be float64 of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if matrix.dim() != 2 or matrix.dtype != torch.float64 or matrix.shape[1] < 5:
        raise ValueError(f"matrix must be float64 (m, 4 + n) with n >= 1, got {matrix.dtype} {tuple(matrix.shape)}")
    if tuple(has_slope.shape) != (matrix.shape[1],) or has_slope.dtype != torch.bool:
        raise ValueError(f"has_slope must be bool of shape ({matrix.shape[1]},), got {has_slope.dtype} "
                         f"{tuple(has_slope.shape)}")
    devices = {t.device for t in (logits, distances, basis, matrix, slopes, safe_slopes, has_slope)}
    if len(devices) > 1:
        raise ValueError(f"every tensor must be on one device, got {sorted(map(str, devices))}")


_OP = define_inference_op("sound_decision", SCHEMA, fake=_fake, reference=sound_decision_reference)


def sound_decision(logits: torch.Tensor, distances: torch.Tensor, basis: torch.Tensor, forms,
                   epsilon: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f_⊥ float64, certified, top) of the sound test at radius ``epsilon`` for ``logits``
    (B, C), ``distances`` (C, C) and the basis (B, m) of ``forms`` (a
    :class:`~gloro_fast.sound.decision.LinearForms`); see the module docstring."""
    _check(logits, distances, basis, forms.matrix, forms.slopes, forms.safe_slopes, forms.has_slope)
    return _OP(logits.detach(), distances, basis.detach(), forms.matrix, forms.slopes, forms.safe_slopes,
               forms.has_slope, float(forms.factor), float(forms.cap), float(epsilon))
