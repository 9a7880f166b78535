"""Triton kernel for ``power_iteration_linear(W, u, n_iter)``: spectral norms of many dense layers.

For each layer l, with W_l ∈ R^{m×n} and a unit iterate u_l ∈ R^n:

    repeat n_iter times:  u ← Wᵀ W u / ‖Wᵀ W u‖   (u kept where ‖Wᵀ W u‖ = 0)
    σ_l = ‖W_l u_l‖                                (gradient w.r.t. W only)

One launch runs every iteration of every layer: one program per layer walks its matrix in
(BLOCK_M × BLOCK_N) tiles. Layers are packed into one flat buffer with an int64 table of
(weight offset, iterate offset, row offset, m, n) per layer; an iteration is three fused
phases separated by CTA barriers: v = W u (row-block sweep), t = Wᵀ v with ‖t‖² on the
fly (column-block sweep), u = t / ‖t‖. The last v = W u gives σ. Backward: v = W u again
(the same kernel with no iteration), then grad_W_l = g_l (W_l u_l) u_lᵀ / σ_l (0 where
σ_l = 0), one launch for all layers.

Note: one program per layer keeps the whole iteration in one launch without a grid-wide
barrier, at the price of one SM per layer; for a few very large layers a split-K design
with one launch per phase would use the GPU better.

Registered in the backend table (:mod:`gloro_fast.ops.registry`) as the ``triton``
implementation of the op ``gloro_fast::power_iteration_linear``: :func:`_forward` and
:func:`_backward` take exactly the op's and its backward's schema arguments. Layers of
different dtypes run in one launch per dtype.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from gloro_fast.ops.registry import register_kernels

from ._utils import MAX_GRID_X, MAX_GRID_YZ, acc_dtype, check_dtype, configs, contiguous, unusable_reason

__all__ = ["BACKWARD_BLOCK", "backward_grids", "backward_kernel", "forward_kernel", "layer_table"]

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
def forward_kernel(
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
        # phase 3: cur = t / ‖t‖, or keep cur where ‖t‖ is 0 or not finite (norm - norm is 0
        # exactly when norm is finite)
        norm = tl.sqrt(tl.sum(sq, axis=0))
        keep_old = ((norm > 0) & (norm - norm == 0)) == 0
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
def backward_kernel(
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
_tables: Dict[tuple, torch.Tensor] = {}


def layer_table(shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(L, 5) int64 table: weight offset, iterate offset, row offset, m, n. Cached per shapes
    and device, so repeated calls (and CUDA-graph replays) do no host-to-device copy."""
    key = (tuple(shapes), str(device))
    if not torch.compiler.is_compiling() and key in _tables:
        return _tables[key]
    rows, w_off, u_off, v_off = [], 0, 0, 0
    for m, n in shapes:
        rows.append([w_off, u_off, v_off, m, n])
        w_off, u_off, v_off = w_off + m * n, u_off + n, v_off + m
    meta = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, _META_COLS)
    if not torch.compiler.is_compiling():
        _tables[key] = meta
    return meta


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return contiguous(tensors[0]).reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def _launch_forward(weights: List[torch.Tensor], iterates: List[torch.Tensor], n_iter: int):
    """Packed (u_new (Σn,), sigma (L,), v = W u (Σm,), accumulation dtype) for layers of one dtype."""
    check_dtype("weights[0]", weights[0])
    shapes = [tuple(w.shape) for w in weights]
    L = len(shapes)
    dtype, device = weights[0].dtype, weights[0].device
    acc = acc_dtype(dtype)
    meta = layer_table(shapes, device)
    sum_m = sum(s[0] for s in shapes)
    sum_n = sum(s[1] for s in shapes)
    u_out = torch.empty((sum_n,), dtype=dtype, device=device)
    sigma = torch.empty((L,), dtype=dtype, device=device)
    v = torch.empty((sum_m,), dtype=acc, device=device)
    cur = torch.empty((sum_n,), dtype=acc, device=device)
    t = torch.empty((sum_n,), dtype=acc, device=device)
    forward_kernel[(L,)](
        _flat(weights), _flat(iterates), meta, u_out, sigma, v, cur, t,
        n_iter, L, max(s[0] for s in shapes), max(s[1] for s in shapes),
        FP64=acc == torch.float64,
    )
    return u_out, sigma, v


BACKWARD_BLOCK = 1024


def backward_grids(n_layers: int, max_numel: int, block: int = BACKWARD_BLOCK):
    """(layer0, grid) of each backward launch: chunks of a layer on axis x, layers on axis y
    in groups within CUDA's grid limits (x ≤ 2³¹ − 1, y ≤ 65,535)."""
    chunks = max(1, triton.cdiv(max_numel, block))
    if chunks > MAX_GRID_X:
        raise ValueError(f"power_iteration_linear: a layer of {max_numel} weights is too large for one launch")
    return [(l0, (chunks, min(MAX_GRID_YZ, n_layers - l0))) for l0 in range(0, n_layers, MAX_GRID_YZ)]


def _by_dtype(weights: Sequence[torch.Tensor]) -> Dict[torch.dtype, List[int]]:
    """Layer indices per dtype: one launch per dtype (one group in the usual case)."""
    groups: Dict[torch.dtype, List[int]] = {}
    for k, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(k)
    return groups


def _forward(weights: List[torch.Tensor], iterates: List[torch.Tensor], n_iter: int):
    """(new iterates, sigmas, images W u): every layer of a dtype in one launch."""
    new_iterates: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    sigmas: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    images: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for idx in _by_dtype(weights).values():
        group = [weights[k] for k in idx]
        u_flat, sigma, v = _launch_forward(group, [iterates[k] for k in idx], n_iter)
        for k, u, s, y in zip(idx, u_flat.split([w.shape[1] for w in group]), sigma.unbind(0),
                              v.split([w.shape[0] for w in group])):
            new_iterates[k], sigmas[k], images[k] = u, s, y
    return new_iterates, sigmas, images


def _backward(grad_sigmas: List[torch.Tensor], weights: List[torch.Tensor], iterates: List[torch.Tensor],
              sigmas: List[torch.Tensor], images: List[torch.Tensor]) -> List[torch.Tensor]:
    """grad_W_l = (g_l / σ_l) y_l u_lᵀ (0 where σ_l = 0) from the forward's images y_l = W_l u_l,
    every layer of a dtype in one launch (W is not read)."""
    grads: List[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for idx in _by_dtype(weights).values():
        group = [weights[k] for k in idx]
        u = _flat([iterates[k] for k in idx])
        v = _flat([images[k] for k in idx]).to(acc_dtype(group[0].dtype))
        grad_sigma = torch.stack([grad_sigmas[k].reshape(()) for k in idx]).to(group[0].dtype)
        sigma = torch.stack([sigmas[k].reshape(()) for k in idx]).to(group[0].dtype)
        pairs = [tuple(w.shape) for w in group]
        meta = layer_table(pairs, u.device)
        grad_w = torch.empty((sum(m * n for m, n in pairs),), dtype=group[0].dtype, device=u.device)
        for layer0, grid in backward_grids(len(pairs), max(m * n for m, n in pairs)):
            backward_kernel[grid](
                grad_sigma, sigma, v, u, meta, grad_w, layer0,
                FP64=v.dtype == torch.float64, BLOCK=BACKWARD_BLOCK, num_warps=4,
            )
        for k, g in zip(idx, grad_w.split([m * n for m, n in pairs])):
            grads[k] = g.view(weights[k].shape)
    return grads


register_kernels("power_iteration_linear", "triton", forward=_forward, backward=_backward,
                 unusable=unusable_reason)
