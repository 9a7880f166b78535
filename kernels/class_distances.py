"""Triton kernels for ``class_distances(W)``: D_ji = ‖w_j − w_i‖₂ for W ∈ R^{C×d}.

Forward (two modes, one C×C output, never a C×C×d tensor):

- Gram (default): each program owns a (BLOCK_M × BLOCK_N) tile of D and walks the d axis in
  BLOCK_K steps, accumulating w_j·w_i with ``tl.dot`` (IEEE fp32, no TF32: the Gram form
  cancels) and the two tiles' row norms on the way; epilogue ‖w_j‖² + ‖w_i‖² − 2 w_j·w_i,
  clamped at 0, sqrt, diagonal set to exactly 0.
- exact: direct differences Σ_k (w_jk − w_ik)² per tile (no cancellation; for certification).

Backward: with M = G / D (0 where D = 0) and S = M + Mᵀ,
grad_W = diag(S·1) W − S W. A Triton kernel builds S and its row sums in one pass over G and
D; the C×C by C×d product is a library GEMM (``torch.addmm``).

Public entry: :func:`class_distances` (same signature as ``gloro_fast.ops.class_distances``),
backed by the custom op ``gloro_fast::class_distances_triton`` (``torch.library.triton_op``,
so ``torch.compile`` sees the kernels) with ``register_autograd``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gloro_fast.ops.class_distances import _backward_with, _check_args, _setup_context

from ._utils import INTERPRET, acc_dtype, check_device, check_dtype, configs, contiguous

__all__ = ["class_distances", "class_distances_forward", "class_distances_backward"]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _store_distances(out_ptr, sq, rm, rn, mask_m, mask_n, C):
    """Store the tile √sq of D (rows rm, columns rn), its diagonal exactly 0."""
    dist = tl.sqrt(sq)
    dist = tl.where(rm[:, None] == rn[None, :], 0.0, dist)
    tl.store(
        out_ptr + rm[:, None] * C + rn[None, :],
        dist.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        ]
    ),
    key=["C", "d", "FP64", "DOT_FP32"],
)
@triton.jit
def _class_distances_gram_kernel(
    w_ptr, out_ptr, C, d,
    FP64: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_t = tl.float64 if FP64 else tl.float32
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < C
    mask_n = rn < C
    gram = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    norm_m = tl.zeros((BLOCK_M,), dtype=acc_t)
    norm_n = tl.zeros((BLOCK_N,), dtype=acc_t)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < d
        a = tl.load(w_ptr + rm[:, None] * d + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + rn[:, None] * d + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP64:
            # no fp64 tensor-core path is assumed: a plain multiply-reduce
            gram += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        elif DOT_FP32:
            # exact for 16-bit inputs (their products are exact in fp32); used where the
            # interpreter's 16-bit dot is unreliable
            gram += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            gram += tl.dot(a, tl.trans(b), input_precision="ieee")
        af = a.to(acc_t)
        bf = b.to(acc_t)
        norm_m += tl.sum(af * af, axis=1)
        norm_n += tl.sum(bf * bf, axis=1)
    sq = norm_m[:, None] + norm_n[None, :] - 2.0 * gram
    _store_distances(out_ptr, tl.maximum(sq, 0.0), rm, rn, mask_m, mask_n, C)


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 8}, num_warps=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=8),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 8}, num_warps=8),
        ]
    ),
    key=["C", "d", "FP64"],
)
@triton.jit
def _class_distances_exact_kernel(
    w_ptr, out_ptr, C, d,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_t = tl.float64 if FP64 else tl.float32
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8),
        ]
    ),
    key=["C", "FP64"],
)
@triton.jit
def _class_distances_bwd_s_kernel(
    g_ptr, d_ptr, s_ptr, rowsum_ptr, C,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """S = G/D + (G/D)ᵀ (0 where D = 0) and its row sums, one row block per program."""
    pid = tl.program_id(0)
    acc_t = tl.float64 if FP64 else tl.float32
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < C
    rowsum = tl.zeros((BLOCK_M,), dtype=acc_t)
    for n0 in range(0, C, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
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


# ----------------------------------------------------------------------------- launchers
def _grid2(C):
    return lambda meta: (triton.cdiv(C, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_N"]))


@torch.library.triton_op("gloro_fast::class_distances_triton", mutates_args=())
def class_distances_forward(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """D (C×C) from W (C×d) with the Gram (default) or the direct-difference kernel."""
    weight = contiguous(weight)
    C, d = weight.shape
    out = torch.empty((C, C), dtype=weight.dtype, device=weight.device)
    fp64 = weight.dtype == torch.float64
    if exact:
        torch.library.wrap_triton(_class_distances_exact_kernel)[_grid2(C)](
            weight, out, C, d, FP64=fp64
        )
    else:
        # the Triton interpreter's bfloat16 tl.dot reads raw bits: upcast there
        dot_fp32 = INTERPRET and weight.dtype == torch.bfloat16
        torch.library.wrap_triton(_class_distances_gram_kernel)[_grid2(C)](
            weight, out, C, d, FP64=fp64, DOT_FP32=dot_fp32
        )
    return out


@torch.library.triton_op("gloro_fast::class_distances_backward_triton", mutates_args=())
def class_distances_backward(
    grad: torch.Tensor, weight: torch.Tensor, distances: torch.Tensor
) -> torch.Tensor:
    """grad_W = diag(S·1) W − S W with S = G/D + (G/D)ᵀ (0 where D = 0)."""
    grad = contiguous(grad)
    weight = contiguous(weight)
    distances = contiguous(distances)
    C = weight.shape[0]
    acc = acc_dtype(weight.dtype)
    s = torch.empty((C, C), dtype=acc, device=weight.device)
    rowsum = torch.empty((C,), dtype=acc, device=weight.device)
    torch.library.wrap_triton(_class_distances_bwd_s_kernel)[
        lambda meta: (triton.cdiv(C, meta["BLOCK_M"]),)
    ](grad, distances, s, rowsum, C, FP64=acc == torch.float64)
    w = weight.to(acc)
    return torch.addmm(w * rowsum[:, None], s, w, alpha=-1.0).to(weight.dtype)


class_distances_forward.register_autograd(
    _backward_with("class_distances_backward_triton"), setup_context=_setup_context
)


# ----------------------------------------------------------------------------- public entry
def class_distances(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Pairwise row distances of ``weight`` (C, d) → (C, C), differentiable (Triton).

    Same contract as :func:`gloro_fast.ops.class_distances`; ``weight`` must be a CUDA
    tensor (or a CPU tensor under ``TRITON_INTERPRET=1``).
    """
    _check_args(weight)
    check_dtype("weight", weight)
    check_device(weight)
    return torch.ops.gloro_fast.class_distances_triton(weight, bool(exact))
