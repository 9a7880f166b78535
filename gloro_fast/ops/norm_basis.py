"""``norm_basis(rows, factors, offsets, kinds)``: the per-sample basis of the rounding
allowance, from the norms the certifying pass recorded, in one call.

For k rows r_i (B,) float64 it returns N (B, k + 1) float64, the last column 1:

    N[:, i] = r_i                                   kinds[i] = 0 (already a norm bound)
    N[:, i] = up(up'(√r_i · factor_i) + offset_i)   kinds[i] = 1 (r_i a sum of squares S̃,
                                                    :func:`~gloro_fast.sound.forward_error.
                                                    norm_upper_from_sumsq`)
    N[:, i] = up(up'(r_i · factor_i) + offset_i)    kinds[i] = 2 (r_i a computed norm R̃,
                                                    :func:`~gloro_fast.sound.forward_error.
                                                    activation_norm_upper`)

with up'(x) = x(1 + 2⁻⁵⁰) + 2⁻¹⁰²² and up(x) the same with NaN → +inf
(:func:`~gloro_fast.sound.rounding.up_tensor_inner`, :func:`~gloro_fast.sound.rounding.
up_tensor`). The reference is exactly what :func:`~gloro_fast.sound.forward_error.norm_uppers`
and ``SoundBounds.basis`` compute in torch ops; the C++ kernel performs the same float64
operations in the same order (no fused multiply-add), except that its square root is
correctly rounded (``std::sqrt``) where torch's vectorised float64 ``sqrt`` is faithful
(√2 comes out one ulp low): the two agree to a few units in the last place, and either is
an upper bound of the norm (docs/soundness.md: the bound needs a faithful root only).

Why an op: the reference is some fifteen small float64 operations over (k, B) values (a
stack, the square root, five roundings, the NaN step, the unbinding, the ones column and
the stack of the basis), each a dispatch and a pass; after a batch of 1024 has left the
caches cold they cost ~0.3 ms of a 2C2F certify on 2 cores, and MKL's square root of a few
thousand values wakes its thread team (~60 µs when the OpenMP workers sleep). The kernel
makes one pass on one thread (2C2F's four rows at B = 1024: 22 µs against 157 µs, 2 cores,
OMP_WAIT_POLICY=PASSIVE).

No autograd (a bound, never differentiated: the rows are detached) and no backward op; a
fake kernel gives torch.compile the shape. Kernels: the reference (any device) and the C++
CPU kernel (csrc/cpu/norm_basis.cpp).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..sound.forward_error import BOUND, MEASURED, SUM_OF_SQUARES, finish_norms
from ._library import define_inference_op

__all__ = ["norm_basis", "norm_basis_reference"]

SCHEMA = "(Tensor[] rows, float[] factors, float[] offsets, int[] kinds) -> Tensor"


def norm_basis_reference(rows: List[torch.Tensor], factors: Sequence[float], offsets: Sequence[float],
                         kinds: Sequence[int]) -> torch.Tensor:
    """The computation in torch ops (the live model's before the op):
    :func:`~gloro_fast.sound.forward_error.finish_norms`, then the stack with the ones."""
    return torch.stack(finish_norms(rows, factors, offsets, kinds) + [torch.ones_like(rows[0])], dim=1)


def _fake(rows, factors, offsets, kinds):
    return rows[0].new_empty((rows[0].shape[0], len(rows) + 1))


_OP = define_inference_op("norm_basis", SCHEMA, fake=_fake, reference=norm_basis_reference)


def norm_basis(rows: Sequence[torch.Tensor], factors: Sequence[float], offsets: Sequence[float],
               kinds: Sequence[int]) -> torch.Tensor:
    """The basis (B, k + 1) float64 of k recorded norm rows (see the module docstring):
    ``rows`` k ≥ 1 tensors (B,) float64 on one device, ``kinds`` what each row is (0: a
    bound, 1: a sum of squares, 2: a computed norm), ``factors``/``offsets`` the constants of
    the rows of kinds 1 and 2 (any number elsewhere)."""
    rows = list(rows)
    k = len(rows)
    if k == 0:
        raise ValueError("rows must hold at least one tensor")
    if not (len(factors) == len(offsets) == len(kinds) == k):
        raise ValueError(f"factors, offsets and kinds must each have one entry per row ({k}), got "
                         f"{len(factors)}, {len(offsets)}, {len(kinds)}")
    if any(kind not in (BOUND, SUM_OF_SQUARES, MEASURED) for kind in kinds):
        raise ValueError(f"kinds must be 0 (a bound), 1 (a sum of squares) or 2 (a computed norm), got {list(kinds)}")
    first = rows[0]
    for i, r in enumerate(rows):
        if not isinstance(r, torch.Tensor) or r.dim() != 1 or r.dtype != torch.float64:
            raise ValueError(f"rows[{i}] must be a float64 tensor of shape (B,), got "
                             f"{getattr(r, 'dtype', type(r).__name__)} {tuple(getattr(r, 'shape', ()))}")
        if r.shape != first.shape or r.device != first.device:
            raise ValueError(f"rows must share one shape and device, got {tuple(r.shape)} on {r.device} at rows[{i}] "
                             f"and {tuple(first.shape)} on {first.device} at rows[0]")
    return _OP([r.detach() for r in rows], [float(f) for f in factors], [float(o) for o in offsets],
               [int(kind) for kind in kinds])
