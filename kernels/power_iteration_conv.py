"""Triton epilogues for ``power_iteration_conv``: operator norms of convolutions (or I + conv).

The operator A is the real zero-padded, strided, dilated, grouped convolution on the input
size of the iterate; Aᵀ is ``conv_transpose2d`` with output padding (plus a crop for
asymmetric padding). Both are the library convolutions of
:func:`gloro_fast.ops.power_iteration_conv.conv_operator` / ``conv_operator_adjoint``
(cuDNN on a GPU): the kernels here fuse only the work around them.

    repeat n_iter times:  u ← Aᵀ A u / ‖Aᵀ A u‖   (u kept where the norm is 0)
    σ = ‖A u‖                                      (gradient w.r.t. the kernel only)

Layers of equal shape and hyper-parameters are batched: L kernels (c_out, c_in/g, kh, kw)
stacked along the output channels are one grouped convolution with L·g groups acting on
the L iterates stacked along the channels, so every step costs two library convolutions
and one normalisation launch for all L layers. The normalisation kernel (one program per
layer: ‖x_l‖², then u_l = x_l / ‖x_l‖ or the old u_l where that norm is 0) and the norm
kernel (σ_l = ‖y_l‖) do no host synchronisation, so a step can be captured in a CUDA graph.

Backward: ∂σ_l/∂K_l = conv-weight-gradient of (u_l, g_l y_l / σ_l) (0 where σ_l = 0), with
y_l = A_l u_l kept from the forward; the scaling is a Triton kernel, the weight gradient is
the library's ``conv2d_weight``.

Public entries: :func:`power_iteration_conv` (same arguments as the reference
``power_iteration_conv_reference``; ints, pairs and 4-tuples accepted for the geometry)
and :func:`power_iteration_conv_batched` (lists of equal-shape layers), backed by
``gloro_fast::power_iteration_conv_triton`` with ``register_autograd``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gloro_fast.ops.power_iteration_conv import _check_batched, conv_operator, conv_operator_adjoint

from ._utils import acc_dtype, check_device, check_dtype, configs, contiguous

__all__ = [
    "power_iteration_conv",
    "power_iteration_conv_batched",
    "power_iteration_conv_forward",
    "power_iteration_conv_backward",
    "normalize_segments",
    "segment_norms",
]


# ----------------------------------------------------------------------------- kernels
_SEG_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 512}, num_warps=4),
]


@triton.jit
def _segment_norm(x_ptr, base, seg_len, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """‖x[base : base + seg_len]‖ in the accumulation dtype."""
    acc_t = tl.float64 if FP64 else tl.float32
    offs = tl.arange(0, BLOCK)
    sq = tl.zeros((BLOCK,), dtype=acc_t)
    for k0 in range(0, seg_len, BLOCK):
        kk = k0 + offs
        x = tl.load(x_ptr + base + kk, mask=kk < seg_len, other=0.0).to(acc_t)
        sq += x * x
    return tl.sqrt(tl.sum(sq, axis=0))


@triton.autotune(configs=configs(_SEG_CONFIGS), key=["seg_len", "FP64"])
@triton.jit
def _normalize_segments_kernel(
    x_ptr, old_ptr, out_ptr, seg_len, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_l = x_l / ‖x_l‖ (out_l = old_l where ‖x_l‖ = 0) for the l-th segment of seg_len."""
    seg = tl.program_id(0)
    acc_t = tl.float64 if FP64 else tl.float32
    base = seg.to(tl.int64) * seg_len
    offs = tl.arange(0, BLOCK)
    norm = _segment_norm(x_ptr, base, seg_len, FP64, BLOCK)
    keep_old = norm <= 0
    denom = tl.where(keep_old, 1.0, norm)
    for k0 in range(0, seg_len, BLOCK):
        kk = k0 + offs
        mask = kk < seg_len
        x = tl.load(x_ptr + base + kk, mask=mask, other=0.0).to(acc_t)
        old = tl.load(old_ptr + base + kk, mask=mask, other=0.0).to(acc_t)
        val = tl.where(keep_old, old, x / denom)
        tl.store(out_ptr + base + kk, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=configs(_SEG_CONFIGS), key=["seg_len", "FP64"])
@triton.jit
def _segment_norms_kernel(y_ptr, out_ptr, seg_len, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """out_l = ‖y_l‖ for the l-th segment of seg_len elements."""
    seg = tl.program_id(0)
    norm = _segment_norm(y_ptr, seg.to(tl.int64) * seg_len, seg_len, FP64, BLOCK)
    tl.store(out_ptr + seg, norm.to(out_ptr.dtype.element_ty))


@triton.autotune(configs=configs(_SEG_CONFIGS), key=["seg_len", "FP64"])
@triton.jit
def _scale_segments_kernel(
    y_ptr, g_ptr, sigma_ptr, out_ptr, seg_len, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_l = (g_l / σ_l) y_l (0 where σ_l = 0); grid (segments, chunks)."""
    seg = tl.program_id(0)
    chunk = tl.program_id(1)
    acc_t = tl.float64 if FP64 else tl.float32
    g = tl.load(g_ptr + seg).to(acc_t)
    sigma = tl.load(sigma_ptr + seg).to(acc_t)
    scale = tl.where(sigma > 0, g / tl.where(sigma > 0, sigma, 1.0), 0.0)
    kk = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = kk < seg_len
    base = seg.to(tl.int64) * seg_len
    y = tl.load(y_ptr + base + kk, mask=mask, other=0.0).to(acc_t)
    tl.store(out_ptr + base + kk, (scale * y).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def normalize_segments(x: torch.Tensor, old: torch.Tensor, n_seg: int) -> torch.Tensor:
    """x split into n_seg equal contiguous segments, each scaled to unit norm (old kept where 0)."""
    x = contiguous(x)
    old = contiguous(old)
    out = torch.empty_like(x)
    seg_len = x.numel() // n_seg
    torch.library.wrap_triton(_normalize_segments_kernel)[(n_seg,)](
        x, old, out, seg_len, FP64=acc_dtype(x.dtype) == torch.float64
    )
    return out


def segment_norms(y: torch.Tensor, n_seg: int) -> torch.Tensor:
    """(n_seg,) l2 norms of the n_seg equal contiguous segments of y."""
    y = contiguous(y)
    out = torch.empty((n_seg,), dtype=y.dtype, device=y.device)
    torch.library.wrap_triton(_segment_norms_kernel)[(n_seg,)](
        y, out, y.numel() // n_seg, FP64=acc_dtype(y.dtype) == torch.float64
    )
    return out


def _stack(weights: List[torch.Tensor], iterates: List[torch.Tensor]):
    if len(weights) == 1:
        return contiguous(weights[0]), contiguous(iterates[0])
    return torch.cat(weights, 0), torch.cat(iterates, 1)


@torch.library.triton_op("gloro_fast::power_iteration_conv_triton", mutates_args=())
def power_iteration_conv_forward(
    weights: List[torch.Tensor],
    iterates: List[torch.Tensor],
    n_iter: int,
    stride: List[int],
    pads: List[int],
    dilation: List[int],
    groups: int,
    residual: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u_new (1, L·c_in, H, W), sigma (L,), y = A u (1, L·c_out, H', W')) for L equal-shape layers."""
    L = len(weights)
    weight, u = _stack(weights, iterates)
    args = (tuple(stride), tuple(pads), tuple(dilation), groups * L)
    hw = tuple(u.shape[2:])
    if n_iter == 0:
        u = u.clone()  # outputs must not alias inputs
    for _ in range(n_iter):
        v = conv_operator(u, weight, *args, residual=residual)
        x = conv_operator_adjoint(v, weight, *args, hw, residual=residual)
        u = normalize_segments(x, u, L)
    y = contiguous(conv_operator(u, weight, *args, residual=residual))
    sigma = segment_norms(y, L)
    return u, sigma, y


@torch.library.triton_op("gloro_fast::power_iteration_conv_backward_triton", mutates_args=())
def power_iteration_conv_backward(
    grad_sigma: torch.Tensor,
    sigma: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    weight_shape: List[int],
    stride: List[int],
    pads: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """Gradient w.r.t. the stacked kernel (L·c_out, c_in/g, kh, kw) of Σ_l g_l σ_l."""
    L = sigma.shape[0]
    grad_sigma = contiguous(grad_sigma)
    y = contiguous(y)
    seg_len = y.numel() // L
    gy = torch.empty_like(y)
    torch.library.wrap_triton(_scale_segments_kernel)[
        lambda meta: (L, triton.cdiv(seg_len, meta["BLOCK"]))
    ](y, grad_sigma, sigma, gy, seg_len, FP64=acc_dtype(y.dtype) == torch.float64)
    top, bottom, left, right = pads
    if top == bottom and left == right:
        inp, padding = u, (top, left)
    else:
        inp, padding = F.pad(u, (left, right, top, bottom)), (0, 0)
    return torch.nn.grad.conv2d_weight(
        inp, list(weight_shape), gy, tuple(stride), padding, tuple(dilation), groups * L
    )


def _setup_context(ctx, inputs, output):
    weights, _iterates, _n_iter, stride, pads, dilation, groups, _residual = inputs
    u, sigma, y = output
    ctx.save_for_backward(sigma, u, y)
    ctx.geometry = (list(stride), list(pads), list(dilation), groups)
    ctx.weight_shape = list(weights[0].shape)
    ctx.n_layers = len(weights)


def _backward(ctx, _grad_u, grad_sigma, _grad_y):
    sigma, u, y = ctx.saved_tensors
    stride, pads, dilation, groups = ctx.geometry
    L = ctx.n_layers
    if grad_sigma is None:  # pragma: no cover
        grad_sigma = torch.zeros_like(sigma)
    shape = [ctx.weight_shape[0] * L] + ctx.weight_shape[1:]
    grad = torch.ops.gloro_fast.power_iteration_conv_backward_triton(
        grad_sigma, sigma, u, y, shape, stride, pads, dilation, groups
    )
    grads = list(grad.chunk(L, 0)) if L > 1 else [grad]
    return grads, [None] * L, None, None, None, None, None, None


power_iteration_conv_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entries
def power_iteration_conv_batched(
    weights: Sequence[torch.Tensor],
    iterates: Sequence[torch.Tensor],
    n_iter: int = 1,
    stride: Union[int, Sequence[int]] = 1,
    pads: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    residual: bool = False,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Power iteration on L convolutions of equal shape and geometry, batched (Triton).

    Returns ``(list of u_new, list of sigma)``: u_new (1, c_in, H, W) detached, sigma 0-dim
    and differentiable w.r.t. its kernel.
    """
    weights, iterates, checked = _check_batched(
        weights, iterates, n_iter, stride, pads, dilation, groups, residual
    )
    if not weights:
        raise ValueError("weights and iterates must be non-empty lists of the same length")
    n_iter, stride, pads, dilation, groups = checked
    check_dtype("weight", weights[0])
    check_device(weights[0])
    L = len(weights)
    u, sigma, _y = torch.ops.gloro_fast.power_iteration_conv_triton(
        weights, iterates, n_iter, list(stride), list(pads), list(dilation), groups, bool(residual)
    )
    u = u.detach()
    us = list(u.chunk(L, 1)) if L > 1 else [u]
    return us, list(sigma.unbind(0))


def power_iteration_conv(
    weight: torch.Tensor,
    iterate: torch.Tensor,
    n_iter: int = 1,
    stride: Union[int, Sequence[int]] = 1,
    pads: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    residual: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on one convolution operator (or I + conv) (Triton epilogues).

    Same semantics as ``gloro_fast.ops.power_iteration_conv_reference(weight, iterate,
    n_iter, stride, pads, dilation, groups, residual)``; returns ``(u_new, sigma)``.
    """
    us, sigmas = power_iteration_conv_batched(
        [weight], [iterate], n_iter, stride, pads, dilation, groups, residual
    )
    return us[0], sigmas[0]
