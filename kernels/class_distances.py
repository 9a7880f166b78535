"""Triton kernels for ``class_distances(W)``: D_ji = ‖w_j − w_i‖₂ for W ∈ R^{C×d}.

Forward, the same mode choice as the spec (``torch.cdist``) and the C++ backends; one C×C
output, never a C×C×d tensor:

- direct differences Σ_k (w_jk − w_ik)² per tile, for ``exact=True`` (certification) and
  for every C < 26 (cheap there, and free of cancellation);
- centred Gram for C ≥ 26: D is translation invariant, so the rows are centred on their
  mean μ (computed once, subtracted from each tile as it is loaded) before
  ‖v_j‖² + ‖v_i‖² − 2 v_j·v_i; without centring, rows sharing a large offset lose most of
  their digits to cancellation. Each program owns a (BLOCK_M × BLOCK_N) tile of D and
  walks the d axis in BLOCK_K steps with ``tl.dot`` in the accumulation dtype (IEEE fp32,
  never TF32; fp64 on the fp64 MMA units), epilogue clamped at 0, sqrt, diagonal exactly 0.

All addresses are computed in int64: C·d or C² may pass 2³¹.

Backward: with M = G / D (0 where D = 0) and S = M + Mᵀ,
grad_W = diag(S·1) V − S V on the centred rows V (the expression is translation
invariant, and centring keeps the two terms small). A Triton kernel builds S and its row
sums in one pass over G and D; the C×C by C×d product is a library GEMM (``torch.addmm``).

Registered in the backend table (:mod:`gloro_fast.ops.registry`) as the ``triton``
implementation of the op ``gloro_fast::class_distances``: :func:`_forward` and
:func:`_backward` take exactly the op's and its backward's schema arguments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gloro_fast.ops.registry import register_kernels

from ._utils import acc_dtype, check_dtype, configs, contiguous, unusable_reason

__all__ = ["BACKWARD_S_KERNELS", "EXACT_KERNELS", "GRAM_KERNELS", "GRAM_MIN_CLASSES", "uses_gram"]

# torch.cdist (the spec) and the C++ backends use the GEMM form from 26 rows on
GRAM_MIN_CLASSES = 26


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _tile_rows(pid, BLOCK: tl.constexpr):
    """int64 row indices of tile ``pid`` (C·d and C² may pass 2³¹)."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _store_distances(out_ptr, sq, rm, rn, mask_m, mask_n, C):
    """Store the tile √sq of D (rows rm, columns rn, int64), its diagonal exactly 0."""
    dist = tl.sqrt(sq)
    dist = tl.where(rm[:, None] == rn[None, :], 0.0, dist)
    tl.store(
        out_ptr + rm[:, None] * C + rn[None, :],
        dist.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _class_distances_gram_kernel(
    w_ptr, mean_ptr, out_ptr, C, d,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_t = tl.float64 if FP64 else tl.float32
    rm = _tile_rows(tl.program_id(0), BLOCK_M)
    rn = _tile_rows(tl.program_id(1), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < C
    mask_n = rn < C
    gram = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    norm_m = tl.zeros((BLOCK_M,), dtype=acc_t)
    norm_n = tl.zeros((BLOCK_N,), dtype=acc_t)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < d
        mu = tl.load(mean_ptr + kk, mask=mask_k, other=0.0)
        mask_a = mask_m[:, None] & mask_k[None, :]
        mask_b = mask_n[:, None] & mask_k[None, :]
        a = tl.load(w_ptr + rm[:, None] * d + kk[None, :], mask=mask_a, other=0.0).to(acc_t)
        b = tl.load(w_ptr + rn[:, None] * d + kk[None, :], mask=mask_b, other=0.0).to(acc_t)
        # centred rows; the padding stays exactly 0
        a = tl.where(mask_a, a - mu[None, :], 0.0)
        b = tl.where(mask_b, b - mu[None, :], 0.0)
        # IEEE: TF32 would cost ~1e-3 relative here, and the Gram form cancels
        gram += tl.dot(a, tl.trans(b), input_precision="ieee")
        norm_m += tl.sum(a * a, axis=1)
        norm_n += tl.sum(b * b, axis=1)
    sq = norm_m[:, None] + norm_n[None, :] - 2.0 * gram
    _store_distances(out_ptr, tl.maximum(sq, 0.0), rm, rn, mask_m, mask_n, C)


@triton.jit
def _class_distances_exact_kernel(
    w_ptr, out_ptr, C, d,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_t = tl.float64 if FP64 else tl.float32
    rm = _tile_rows(tl.program_id(0), BLOCK_M)
    rn = _tile_rows(tl.program_id(1), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < C
    mask_n = rn < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < d
        a = tl.load(w_ptr + rm[:, None] * d + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + rn[:, None] * d + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        diff = a.to(acc_t)[:, None, :] - b.to(acc_t)[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    _store_distances(out_ptr, acc, rm, rn, mask_m, mask_n, C)


# Autotuning configs, per accumulation dtype (the dicts below are keyed by "float64?"): every one
# compiles for sm_90 in seconds without spilling (``make kernels-check``). The 3-D broadcast
# tile of the exact kernel holds BLOCK_M·BLOCK_N·BLOCK_K values in registers, so its fp64
# tiles are half the size.
_GRAM_FP32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]
_GRAM_FP64 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
]
_EXACT_FP32 = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 8}, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 8}, num_warps=8),
]
_EXACT_FP64 = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 8}, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 8}, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 8}, num_warps=4),
]
_KEY = ["C", "d"]
GRAM_KERNELS = {
    False: triton.autotune(configs=configs(_GRAM_FP32), key=_KEY)(_class_distances_gram_kernel),
    True: triton.autotune(configs=configs(_GRAM_FP64), key=_KEY)(_class_distances_gram_kernel),
}
EXACT_KERNELS = {
    False: triton.autotune(configs=configs(_EXACT_FP32), key=_KEY)(_class_distances_exact_kernel),
    True: triton.autotune(configs=configs(_EXACT_FP64), key=_KEY)(_class_distances_exact_kernel),
}


@triton.jit
def _class_distances_bwd_s_kernel(
    g_ptr, d_ptr, s_ptr, rowsum_ptr, C,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """S = G/D + (G/D)ᵀ (0 where D = 0) and its row sums, one row block per program."""
    acc_t = tl.float64 if FP64 else tl.float32
    rm = _tile_rows(tl.program_id(0), BLOCK_M)
    mask_m = rm < C
    rowsum = tl.zeros((BLOCK_M,), dtype=acc_t)
    for n0 in range(0, C, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = mask_m[:, None] & (rn < C)[None, :]
        idx = rm[:, None] * C + rn[None, :]
        idx_t = rn[None, :] * C + rm[:, None]
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc_t)
        g_t = tl.load(g_ptr + idx_t, mask=mask, other=0.0).to(acc_t)
        dd = tl.load(d_ptr + idx, mask=mask, other=0.0).to(acc_t)
        dd_t = tl.load(d_ptr + idx_t, mask=mask, other=0.0).to(acc_t)
        s = tl.where(dd > 0, g / tl.where(dd > 0, dd, 1.0), 0.0)
        s += tl.where(dd_t > 0, g_t / tl.where(dd_t > 0, dd_t, 1.0), 0.0)
        tl.store(s_ptr + idx, s, mask=mask)
        rowsum += tl.sum(s, axis=1)
    tl.store(rowsum_ptr + rm, rowsum, mask=mask_m)


BACKWARD_S_KERNELS = {
    False: triton.autotune(configs=configs([
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8),
    ]), key=["C"])(_class_distances_bwd_s_kernel),
    True: triton.autotune(configs=configs([
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8),
    ]), key=["C"])(_class_distances_bwd_s_kernel),
}


# ----------------------------------------------------------------------------- launchers
def _grid2(C):
    return lambda meta: (triton.cdiv(C, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_N"]))


def uses_gram(num_classes: int, exact: bool) -> bool:
    """Whether the forward takes the centred Gram form (else direct differences)."""
    return not exact and num_classes >= GRAM_MIN_CLASSES


def _forward(weight: torch.Tensor, exact: bool) -> torch.Tensor:
    """D (C×C) from W (C×d): direct differences (exact, or C < 26) or the centred Gram form."""
    check_dtype("weight", weight)
    weight = contiguous(weight)
    C, d = weight.shape
    out = torch.empty((C, C), dtype=weight.dtype, device=weight.device)
    acc = acc_dtype(weight.dtype)
    fp64 = acc == torch.float64
    if uses_gram(C, exact):
        mean = weight.to(acc).mean(0)
        GRAM_KERNELS[fp64][_grid2(C)](weight, mean, out, C, d, FP64=fp64)
    else:
        EXACT_KERNELS[fp64][_grid2(C)](weight, out, C, d, FP64=fp64)
    return out


def _backward(grad: torch.Tensor, weight: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """grad_W = diag(S·1) W − S W with S = G/D + (G/D)ᵀ (0 where D = 0)."""
    grad = contiguous(grad)
    weight = contiguous(weight)
    distances = contiguous(distances)
    C = weight.shape[0]
    acc = acc_dtype(weight.dtype)
    s = torch.empty((C, C), dtype=acc, device=weight.device)
    rowsum = torch.empty((C,), dtype=acc, device=weight.device)
    fp64 = acc == torch.float64
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_M"]),)  # noqa: E731
    BACKWARD_S_KERNELS[fp64][grid](grad, distances, s, rowsum, C, FP64=fp64)
    w = weight.to(acc)
    w = w - w.mean(0)  # centred rows: the same gradient, less cancellation between the terms
    return torch.addmm(w * rowsum[:, None], s, w, alpha=-1.0).to(weight.dtype)


register_kernels("class_distances", "triton", forward=_forward, backward=_backward, unusable=unusable_reason)
