"""Triton kernels for ``bottom_logit(f, D, K, eps, classes)``: the ⊥ logit of a GloRo net.

For each row b, with j = classes[b] (default: argmax f_b, lowest index on ties):

    f_⊥ = max_{i ≠ j} (f_i + ε·K·D_ji),   i* = the maximising i (lowest index on ties).

Forward: one program per block of BLOCK_B rows, walking the classes in BLOCK_C chunks
(a running max/argmax carries across chunks, so any C works): pass 1 finds j (skipped when
classes are given), pass 2 gathers D[j], adds ε·K·D, masks index j only and reduces.
Writes f_⊥, i* and j; nothing B×C is materialised.

Backward (for an upstream gradient g of f_⊥): grad_f = g at [b, i*] (rows written once,
zeros elsewhere), grad_D[j, i*] += ε·K·g (float atomics into an fp32/fp64 buffer: the
summation order of rows sharing a (j, i*) pair is not deterministic, so under
``torch.use_deterministic_algorithms(True)`` a deterministic ``index_put_`` does it), grad_K =
ε Σ_b g_b D[j_b, i*_b] (per-program partial sums, then one deterministic sum).

Class indices outside [0, C) (the op rejects them; the kernels may be called directly) give
f_⊥ = NaN and i* = −1, and nothing outside D is read or written.

Registered in the backend table (:mod:`gloro_fast.ops.registry`) as the ``triton``
implementation of the op ``gloro_fast::bottom_logit``: :func:`_forward` and :func:`_backward`
take exactly the op's and its backward's schema arguments.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gloro_fast.ops.registry import register_kernels

from ._utils import acc_dtype, check_dtype, configs, contiguous, unusable_reason

__all__ = [
    "BACKWARD_BLOCK_B",
    "FORWARD_CONFIGS_NARROW",
    "FORWARD_CONFIGS_WIDE",
    "MAX_BLOCK_C",
    "backward_kernel",
    "block_c",
    "forward_kernel",
]

MAX_BLOCK_C = 256  # classes per chunk; larger C loops over chunks


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _bottom_logit_fwd_kernel(
    f_ptr, d_ptr, ek_ptr, cls_ptr, fbot_ptr, istar_ptr, j_ptr, B, C,
    HAS_CLASSES: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_t = tl.float64 if FP64 else tl.float32
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rb < B
    rc = tl.arange(0, BLOCK_C)
    row = rb.to(tl.int64) * C
    ek = tl.load(ek_ptr).to(acc_t)

    if HAS_CLASSES:
        j_given = tl.load(cls_ptr + rb, mask=mask_b, other=0).to(tl.int64)
        valid = (j_given >= 0) & (j_given < C)  # the op rejects others; here they read nothing
        j = tl.where(valid, j_given, 0).to(tl.int32)
    else:
        best = tl.full((BLOCK_B,), float("-inf"), acc_t)
        j = tl.zeros((BLOCK_B,), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + rc
            m = mask_b[:, None] & (cc < C)[None, :]
            f = tl.load(f_ptr + row[:, None] + cc[None, :], mask=m, other=float("-inf")).to(acc_t)
            cmax, carg = tl.max(f, axis=1, return_indices=True, return_indices_tie_break_left=True)
            take = cmax > best  # strict: an earlier chunk keeps its (lower) index on ties
            j = tl.where(take, carg.to(tl.int32) + c0, j)
            best = tl.where(take, cmax, best)

    bottom = tl.full((BLOCK_B,), float("-inf"), acc_t)
    i_star = tl.zeros((BLOCK_B,), dtype=tl.int32)
    drow = j.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + rc
        m = mask_b[:, None] & (cc < C)[None, :]
        f = tl.load(f_ptr + row[:, None] + cc[None, :], mask=m, other=0.0).to(acc_t)
        if HAS_CLASSES:
            dj = tl.load(d_ptr + drow[:, None] + cc[None, :], mask=m & valid[:, None], other=0.0).to(acc_t)
        else:
            dj = tl.load(d_ptr + drow[:, None] + cc[None, :], mask=m, other=0.0).to(acc_t)
        extra = f + ek * dj
        extra = tl.where(m & (cc[None, :] != j[:, None]), extra, float("-inf"))
        cmax, carg = tl.max(extra, axis=1, return_indices=True, return_indices_tie_break_left=True)
        take = cmax > bottom
        i_star = tl.where(take, carg.to(tl.int32) + c0, i_star)
        bottom = tl.where(take, cmax, bottom)

    if HAS_CLASSES:
        bottom = tl.where(valid, bottom, float("nan"))
        i_star = tl.where(valid, i_star, -1)
        tl.store(j_ptr + rb, j_given, mask=mask_b)
    else:
        tl.store(j_ptr + rb, j.to(tl.int64), mask=mask_b)
    tl.store(fbot_ptr + rb, bottom.to(fbot_ptr.dtype.element_ty), mask=mask_b)
    tl.store(istar_ptr + rb, i_star.to(tl.int64), mask=mask_b)


@triton.jit
def backward_kernel(
    g_ptr, istar_ptr, j_ptr, d_ptr, ek_ptr, gf_ptr, gd_ptr, gk_part_ptr, B, C,
    FP64: tl.constexpr, ATOMIC_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_t = tl.float64 if FP64 else tl.float32
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rb < B
    rc = tl.arange(0, BLOCK_C)
    row = rb.to(tl.int64) * C
    g = tl.load(g_ptr + rb, mask=mask_b, other=0.0).to(acc_t)
    i_star = tl.load(istar_ptr + rb, mask=mask_b, other=0)
    j = tl.load(j_ptr + rb, mask=mask_b, other=0)
    # grad wrt the logits: g at i*, 0 elsewhere; every element written exactly once
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + rc
        m = mask_b[:, None] & (cc < C)[None, :]
        val = tl.where(cc[None, :] == i_star[:, None], g[:, None], 0.0)
        tl.store(gf_ptr + row[:, None] + cc[None, :], val.to(gf_ptr.dtype.element_ty), mask=m)
    # grad wrt D: ε·K·g at [j, i*] (rows may share a pair: atomics; with ATOMIC_D off the
    # launcher scatters deterministically instead)
    ek = tl.load(ek_ptr).to(acc_t)
    inside = mask_b & (i_star >= 0) & (i_star < C) & (j >= 0) & (j < C)
    pair = j * C + i_star
    if ATOMIC_D:
        tl.atomic_add(gd_ptr + pair, ek * g, mask=inside)
    # grad wrt K (without the factor ε, applied by the launcher): Σ g·D[j, i*]
    dji = tl.load(d_ptr + pair, mask=inside, other=0.0).to(acc_t)
    tl.store(gk_part_ptr + pid, tl.sum(g * dji, axis=0))


# Autotuning: BLOCK_B rows per program, each walking the classes in BLOCK_C chunks. The key
# leaves the batch size out (a new B must not re-tune), and the configs are split by
# BLOCK_C so that no tile of BLOCK_B × BLOCK_C values spills registers: ≤ 4,096 values for
# 4 warps and ≤ 8,192 for 8 (``make kernels-check``).
FORWARD_CONFIGS_NARROW = [  # BLOCK_C ≤ 64
    triton.Config({"BLOCK_B": 16}, num_warps=4),
    triton.Config({"BLOCK_B": 4}, num_warps=1),
    triton.Config({"BLOCK_B": 8}, num_warps=4),
    triton.Config({"BLOCK_B": 32}, num_warps=4),
    triton.Config({"BLOCK_B": 64}, num_warps=8),
]
FORWARD_CONFIGS_WIDE = [  # BLOCK_C 128 or 256
    triton.Config({"BLOCK_B": 8}, num_warps=4),
    triton.Config({"BLOCK_B": 2}, num_warps=2),
    triton.Config({"BLOCK_B": 4}, num_warps=4),
    triton.Config({"BLOCK_B": 16}, num_warps=8),
]
_FWD_KEY = ["C", "HAS_CLASSES", "FP64"]
_FWD_NARROW = triton.autotune(configs=configs(FORWARD_CONFIGS_NARROW), key=_FWD_KEY)(_bottom_logit_fwd_kernel)
_FWD_WIDE = triton.autotune(configs=configs(FORWARD_CONFIGS_WIDE), key=_FWD_KEY)(_bottom_logit_fwd_kernel)


def forward_kernel(block_c: int):
    """The autotuned forward kernel for chunks of ``block_c`` classes."""
    return _FWD_NARROW if block_c <= 64 else _FWD_WIDE


# ----------------------------------------------------------------------------- launchers
def block_c(C: int) -> int:
    """Classes per chunk for C classes."""
    return min(triton.next_power_of_2(C), MAX_BLOCK_C)


def _scaled_lipschitz(lipschitz: torch.Tensor, epsilon: float, acc: torch.dtype) -> torch.Tensor:
    # ε·K on the device (no host sync), in the accumulation dtype (ε keeps double precision
    # for float64; a Python float kernel argument would be rounded to fp32)
    return (lipschitz.detach().to(acc) * epsilon).reshape(1)


def _forward(logits, distances, lipschitz, epsilon: float, classes: Optional[torch.Tensor]):
    """(f_⊥, i*, j): f_⊥ (B,) in the logits' dtype, i* and j (B,) int64."""
    check_dtype("logits", logits)
    logits = contiguous(logits)
    distances = contiguous(distances)
    B, C = logits.shape
    acc = acc_dtype(logits.dtype)
    ek = _scaled_lipschitz(lipschitz, epsilon, acc)
    f_bot = torch.empty((B,), dtype=logits.dtype, device=logits.device)
    i_star = torch.empty((B,), dtype=torch.int64, device=logits.device)
    j = torch.empty((B,), dtype=torch.int64, device=logits.device)
    has_classes = classes is not None
    cls = contiguous(classes) if has_classes else j  # placeholder pointer, never read
    chunk = block_c(C)
    forward_kernel(chunk)[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
        logits, distances, ek, cls, f_bot, i_star, j, B, C,
        HAS_CLASSES=has_classes, FP64=acc == torch.float64, BLOCK_C=chunk,
    )
    return f_bot, i_star, j


BACKWARD_BLOCK_B = 32


def _backward(grad_bottom, distances, lipschitz, epsilon: float, i_star, classes, num_classes: int):
    """(grad_logits, grad_distances, grad_lipschitz) for the upstream gradient of f_⊥."""
    grad = contiguous(grad_bottom)
    i_star = contiguous(i_star)
    j = contiguous(classes)
    distances = contiguous(distances)
    (B,) = grad.shape
    C = num_classes
    acc = acc_dtype(distances.dtype)
    ek = _scaled_lipschitz(lipschitz, epsilon, acc)
    n_prog = triton.cdiv(B, BACKWARD_BLOCK_B)
    grad_logits = torch.empty((B, C), dtype=distances.dtype, device=distances.device)
    grad_d = torch.zeros((C, C), dtype=acc, device=distances.device)
    gk_part = torch.empty((n_prog,), dtype=acc, device=distances.device)
    # float atomics sum rows sharing a (j, i*) cell in a run-dependent order; under
    # torch.use_deterministic_algorithms the cells are summed by index_put_ instead, which
    # torch then runs deterministically (sorting the indices)
    atomic = not torch.are_deterministic_algorithms_enabled()
    backward_kernel[(n_prog,)](
        grad, i_star, j, distances, ek, grad_logits, grad_d, gk_part, B, C,
        FP64=acc == torch.float64, ATOMIC_D=atomic, BLOCK_B=BACKWARD_BLOCK_B, BLOCK_C=block_c(C), num_warps=4,
    )
    if not atomic:
        grad_d.view(-1).index_put_((j * C + i_star,), grad.to(acc) * ek, accumulate=True)
    grad_k = (gk_part.sum() * epsilon).to(lipschitz.dtype)
    return grad_logits, grad_d.to(distances.dtype), grad_k


register_kernels("bottom_logit", "triton", forward=_forward, backward=_backward, unusable=unusable_reason)
