"""Triton kernel for ``power_iteration_linear(W, u, n_iter)``: spectral norms of many dense layers.

For each layer l, with W_l ∈ R^{m×n} and a unit iterate u_l ∈ R^n:

    repeat n_iter times:  u ← Wᵀ W u / ‖Wᵀ W u‖   (u kept where ‖Wᵀ W u‖ = 0)
    σ_l = ‖W_l u_l‖                                (gradient w.r.t. W only)

One launch runs every iteration of every layer: one program per layer walks its matrix in
(BLOCK_M × BLOCK_N) tiles. Layers are packed into one flat buffer with an int64 table of
(weight offset, iterate offset, row offset, m, n) per layer; an iteration is three fused
phases separated by CTA barriers: v = W u (row-block sweep), t = Wᵀ v with ‖t‖² on the
fly (column-block sweep), u = t / ‖t‖. The last v = W u gives σ and is kept for backward:
grad_W_l = g_l (W_l u_l) u_lᵀ / σ_l (0 where σ_l = 0), one launch for all layers.

Note: one program per layer keeps the whole iteration in one launch without a grid-wide
barrier, at the price of one SM per layer; for a few very large layers a split-K design
with one launch per phase would use the GPU better.

Public entry: :func:`power_iteration_linear` (same signature as
``gloro_fast.ops.power_iteration_linear``), backed by ``gloro_fast::power_iteration_linear_triton``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from gloro_fast.ops.power_iteration_linear import _check_args

from ._utils import MAX_GRID_X, MAX_GRID_YZ, acc_dtype, check_device, check_dtype, configs, contiguous

__all__ = ["power_iteration_linear", "power_iteration_linear_forward", "power_iteration_linear_backward"]

_META_COLS = 5  # w_off, u_off, v_off, m, n


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _matvec(w_base, x_ptr, y_ptr, m, n, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = W x for the row-major m×n W at ``w_base`` (x, y in the accumulation dtype); returns ‖y‖²."""
    acc_t = tl.float64 if FP64 else tl.float32
    rm0 = tl.arange(0, BLOCK_M)
    rn0 = tl.arange(0, BLOCK_N)
    sq_m = tl.zeros((BLOCK_M,), dtype=acc_t)
    for r0 in range(0, m, BLOCK_M):
        rr = r0 + rm0
        mr = rr < m
        acc = tl.zeros((BLOCK_M,), dtype=acc_t)
        for k0 in range(0, n, BLOCK_N):
            kk = k0 + rn0
            mk = kk < n
            w = tl.load(w_base + rr[:, None].to(tl.int64) * n + kk[None, :],
                        mask=mr[:, None] & mk[None, :], other=0.0).to(acc_t)
            x = tl.load(x_ptr + kk, mask=mk, other=0.0)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(y_ptr + rr, acc, mask=mr)
        sq_m += acc * acc
    return tl.sum(sq_m, axis=0)


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 256}, num_warps=8),
        ]
    ),
    key=["L", "MAX_M", "MAX_N", "FP64"],
)
@triton.jit
def _power_iteration_linear_kernel(
    w_ptr, u_in_ptr, meta_ptr, u_out_ptr, sigma_ptr, v_ptr, cur_ptr, t_ptr,
    n_iter, L, MAX_M, MAX_N,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    layer = tl.program_id(0)
    acc_t = tl.float64 if FP64 else tl.float32
    w_off = tl.load(meta_ptr + layer * 5 + 0)
    u_off = tl.load(meta_ptr + layer * 5 + 1)
    v_off = tl.load(meta_ptr + layer * 5 + 2)
    m = tl.load(meta_ptr + layer * 5 + 3)
    n = tl.load(meta_ptr + layer * 5 + 4)
    w_base = w_ptr + w_off
    rm0 = tl.arange(0, BLOCK_M)
    rn0 = tl.arange(0, BLOCK_N)

    # phase 0: cur = u_in (accumulation dtype)
    for k0 in range(0, n, BLOCK_N):
        kk = k0 + rn0
        mk = kk < n
        x = tl.load(u_in_ptr + u_off + kk, mask=mk, other=0.0).to(acc_t)
        tl.store(cur_ptr + u_off + kk, x, mask=mk)
    tl.debug_barrier()

    for _it in range(0, n_iter):
        # phase 1: v = W cur
        _matvec(w_base, cur_ptr + u_off, v_ptr + v_off, m, n, FP64, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        # phase 2: t = Wᵀ v, and ‖t‖²
        sq = tl.zeros((BLOCK_N,), dtype=acc_t)
        for k0 in range(0, n, BLOCK_N):
            kk = k0 + rn0
            mk = kk < n
            acc = tl.zeros((BLOCK_N,), dtype=acc_t)
            for r0 in range(0, m, BLOCK_M):
                rr = r0 + rm0
                mr = rr < m
                w = tl.load(w_base + rr[:, None].to(tl.int64) * n + kk[None, :],
                            mask=mr[:, None] & mk[None, :], other=0.0).to(acc_t)
                y = tl.load(v_ptr + v_off + rr, mask=mr, other=0.0)
                acc += tl.sum(w * y[:, None], axis=0)
            tl.store(t_ptr + u_off + kk, acc, mask=mk)
            sq += acc * acc
        tl.debug_barrier()
        # phase 3: cur = t / ‖t‖, or keep cur where ‖t‖ = 0
        norm = tl.sqrt(tl.sum(sq, axis=0))
        keep_old = norm <= 0
        denom = tl.where(keep_old, 1.0, norm)
        for k0 in range(0, n, BLOCK_N):
            kk = k0 + rn0
            mk = kk < n
            t = tl.load(t_ptr + u_off + kk, mask=mk, other=0.0)
            x = tl.load(cur_ptr + u_off + kk, mask=mk, other=0.0)
            tl.store(cur_ptr + u_off + kk, tl.where(keep_old, x, t / denom), mask=mk)
        tl.debug_barrier()

    # estimate: v = W u, σ = ‖v‖; write the iterate in the weights' dtype
    sq = _matvec(w_base, cur_ptr + u_off, v_ptr + v_off, m, n, FP64, BLOCK_M, BLOCK_N)
    tl.store(sigma_ptr + layer, tl.sqrt(sq).to(sigma_ptr.dtype.element_ty))
    for k0 in range(0, n, BLOCK_N):
        kk = k0 + rn0
        mk = kk < n
        x = tl.load(cur_ptr + u_off + kk, mask=mk, other=0.0)
        tl.store(u_out_ptr + u_off + kk, x.to(u_out_ptr.dtype.element_ty), mask=mk)


@triton.jit
def _power_iteration_linear_bwd_kernel(
    g_ptr, sigma_ptr, v_ptr, u_ptr, meta_ptr, gw_ptr, layer0,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_W_l = (g_l / σ_l) v_l u_lᵀ over a BLOCK-sized chunk of layer l's entries.

    Grid (chunks, layers): the chunks of one layer go on axis x (up to 2³¹ − 1 programs),
    the layers on axis y (at most 65,535 per launch, from ``layer0`` on)."""
    chunk = tl.program_id(0)
    layer = layer0 + tl.program_id(1)
    acc_t = tl.float64 if FP64 else tl.float32
    w_off = tl.load(meta_ptr + layer * 5 + 0)
    u_off = tl.load(meta_ptr + layer * 5 + 1)
    v_off = tl.load(meta_ptr + layer * 5 + 2)
    m = tl.load(meta_ptr + layer * 5 + 3)
    n = tl.load(meta_ptr + layer * 5 + 4)
    numel = m * n
    idx = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if chunk.to(tl.int64) * BLOCK < numel:
        mask = idx < numel
        row = idx // n
        col = idx % n
        g = tl.load(g_ptr + layer).to(acc_t)
        sigma = tl.load(sigma_ptr + layer).to(acc_t)
        scale = tl.where(sigma > 0, g / tl.where(sigma > 0, sigma, 1.0), 0.0)
        v = tl.load(v_ptr + v_off + row, mask=mask, other=0.0).to(acc_t)
        u = tl.load(u_ptr + u_off + col, mask=mask, other=0.0).to(acc_t)
        tl.store(gw_ptr + w_off + idx, (scale * v * u).to(gw_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
_meta_cache: Dict[tuple, torch.Tensor] = {}


def _meta(shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(L, 5) int64 table: weight offset, iterate offset, row offset, m, n. Cached per shapes
    and device, so repeated calls (and CUDA-graph replays) do no host-to-device copy."""
    key = (tuple(shapes), str(device))
    if not torch.compiler.is_compiling() and key in _meta_cache:
        return _meta_cache[key]
    rows, w_off, u_off, v_off = [], 0, 0, 0
    for m, n in shapes:
        rows.append([w_off, u_off, v_off, m, n])
        w_off, u_off, v_off = w_off + m * n, u_off + n, v_off + m
    meta = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, _META_COLS)
    if not torch.compiler.is_compiling():
        _meta_cache[key] = meta
    return meta


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return contiguous(tensors[0]).reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.library.triton_op("gloro_fast::power_iteration_linear_triton", mutates_args=())
def power_iteration_linear_forward(
    weights: List[torch.Tensor], iterates: List[torch.Tensor], n_iter: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (u_new (Σn,), sigma (L,), v = W u (Σm,), accumulation dtype) for all layers."""
    shapes = [tuple(w.shape) for w in weights]
    L = len(shapes)
    dtype, device = weights[0].dtype, weights[0].device
    acc = acc_dtype(dtype)
    w_flat = _flat(weights)
    u_flat = _flat(iterates)
    meta = _meta(shapes, device)
    sum_m = sum(s[0] for s in shapes)
    sum_n = sum(s[1] for s in shapes)
    u_out = torch.empty((sum_n,), dtype=dtype, device=device)
    sigma = torch.empty((L,), dtype=dtype, device=device)
    v = torch.empty((sum_m,), dtype=acc, device=device)
    cur = torch.empty((sum_n,), dtype=acc, device=device)
    t = torch.empty((sum_n,), dtype=acc, device=device)
    torch.library.wrap_triton(_power_iteration_linear_kernel)[(L,)](
        w_flat, u_flat, meta, u_out, sigma, v, cur, t,
        n_iter, L, max(s[0] for s in shapes), max(s[1] for s in shapes),
        FP64=acc == torch.float64,
    )
    return u_out, sigma, v


_BWD_BLOCK = 1024


def backward_grids(n_layers: int, max_numel: int, block: int = _BWD_BLOCK):
    """(layer0, grid) of each backward launch: chunks of a layer on axis x, layers on axis y
    in groups within CUDA's grid limits (x ≤ 2³¹ − 1, y ≤ 65,535)."""
    chunks = max(1, triton.cdiv(max_numel, block))
    if chunks > MAX_GRID_X:
        raise ValueError(f"power_iteration_linear: a layer of {max_numel} weights is too large for one launch")
    return [(l0, (chunks, min(MAX_GRID_YZ, n_layers - l0))) for l0 in range(0, n_layers, MAX_GRID_YZ)]


@torch.library.triton_op("gloro_fast::power_iteration_linear_backward_triton", mutates_args=())
def power_iteration_linear_backward(
    grad_sigma: torch.Tensor,
    sigma: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    shapes: List[int],
) -> torch.Tensor:
    """Packed grad_W (Σ m·n,) = (g_l / σ_l) v_l u_lᵀ per layer; ``shapes`` is [m0, n0, m1, n1, ...]."""
    pairs = [(shapes[2 * k], shapes[2 * k + 1]) for k in range(len(shapes) // 2)]
    grad_sigma = contiguous(grad_sigma)
    meta = _meta(pairs, sigma.device)
    total = sum(m * n for m, n in pairs)
    grad_w = torch.empty((total,), dtype=sigma.dtype, device=sigma.device)
    for layer0, grid in backward_grids(len(pairs), max(m * n for m, n in pairs)):
        torch.library.wrap_triton(_power_iteration_linear_bwd_kernel)[grid](
            grad_sigma, sigma, v, u, meta, grad_w, layer0,
            FP64=v.dtype == torch.float64, BLOCK=_BWD_BLOCK, num_warps=4,
        )
    return grad_w


def _setup_context(ctx, inputs, output):
    weights, _iterates, _n_iter = inputs
    u_out, sigma, v = output
    ctx.save_for_backward(sigma, v, u_out)
    ctx.shapes = [d for w in weights for d in w.shape]


def _backward(ctx, _grad_u, grad_sigma, _grad_v):
    sigma, v, u = ctx.saved_tensors
    if grad_sigma is None:  # pragma: no cover
        grad_sigma = torch.zeros_like(sigma)
    grad_w = torch.ops.gloro_fast.power_iteration_linear_backward_triton(
        grad_sigma, sigma, v, u, ctx.shapes
    )
    grads, off = [], 0
    for k in range(len(ctx.shapes) // 2):
        m, n = ctx.shapes[2 * k], ctx.shapes[2 * k + 1]
        grads.append(grad_w[off : off + m * n].view(m, n))
        off += m * n
    return grads, [None] * len(grads), None


power_iteration_linear_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry
def _run_group(weights, iterates, n_iter):
    u_flat, sigma, _v = torch.ops.gloro_fast.power_iteration_linear_triton(weights, iterates, n_iter)
    u_flat = u_flat.detach()
    new_iterates = list(u_flat.split([w.shape[1] for w in weights]))
    return new_iterates, list(sigma.unbind(0))


def power_iteration_linear(
    weights: Union[torch.Tensor, Sequence[torch.Tensor]],
    iterates: Union[torch.Tensor, Sequence[torch.Tensor]],
    n_iter: int = 1,
):
    """``n_iter`` power iterations on one or many dense layers, all in one kernel launch (Triton).

    Same contract as :func:`gloro_fast.ops.power_iteration_linear`: returns ``(u_new, sigma)``
    for a single layer or ``(list of u_new, list of sigma)`` for lists; u_new is detached,
    sigma is differentiable w.r.t. the weights. Layers of different dtypes or devices are
    run in one launch per (dtype, device) group.
    """
    single, weights, iterates, n_iter = _check_args(weights, iterates, n_iter)
    for k, w in enumerate(weights):
        if w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"weights[{k}] must have shape (m, n) with m, n >= 1, got {tuple(w.shape)}")
        check_dtype(f"weights[{k}]", w)
        check_device(w)
    groups: Dict[tuple, List[int]] = {}
    for k, w in enumerate(weights):
        groups.setdefault((w.dtype, w.device), []).append(k)
    new_iterates: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    sigmas: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for idx in groups.values():
        us, ss = _run_group([weights[k] for k in idx], [iterates[k] for k in idx], n_iter)
        for k, u, s in zip(idx, us, ss):
            new_iterates[k], sigmas[k] = u, s
    if single:
        return new_iterates[0], sigmas[0]
    return new_iterates, sigmas
