"""Triton epilogues for ``power_iteration_conv``: operator norms of convolutions (or I + conv).

The operator A is the real zero-padded, strided, dilated, grouped convolution on the input
size of the iterate; Aᵀ is ``conv_transpose2d`` with output padding (plus a crop for
asymmetric padding). Both are the library convolutions of
:func:`gloro_fast.ops.convolution.conv_operator` / ``conv_operator_adjoint`` (cuDNN on a
GPU): the kernels here fuse only the work around them.

    repeat n_iter times:  u ← Aᵀ A u / ‖Aᵀ A u‖   (u kept where the norm is 0)
    σ = ‖A u‖                                      (gradient w.r.t. the kernel only)

Layers of equal shape and hyper-parameters are batched: L kernels (c_out, c_in/g, kh, kw)
stacked along the output channels are one grouped convolution with L·g groups acting on
the L iterates stacked along the channels, so every step costs two library convolutions
and one normalisation launch for all L layers. The normalisation kernel (one program per
layer: ‖x_l‖², then u_l = x_l / ‖x_l‖ or the old u_l where that norm is 0) and the norm
kernel (σ_l = ‖y_l‖) do no host synchronisation, so a step can be captured in a CUDA graph.

Backward: ∂σ_l/∂K_l = conv-weight-gradient of (u_l, g_l y_l / σ_l) (0 where σ_l = 0), with
y_l = A_l u_l computed again (one convolution); the scaling is a Triton kernel, the weight
gradient is itself one library convolution (:func:`conv2d_weight_ieee`: the padded iterate's
channels as the batch, the scaled output as the kernel, stride and dilation swapped).

Precision: every float32 convolution here runs in IEEE float32 through :func:`conv2d_ieee`
(cuDNN with ``allow_tf32=False``, whatever the global ``torch.backends.cudnn.allow_tf32``
says, which is True by default): TF32 would cost ~1e-4 relative error on σ̂. The kernels run
inside the op ``gloro_fast::power_iteration_conv``, which torch.compile sees as one opaque
call, so no traced ``aten.convolution`` can fall back to the global flag.

Registered in the backend table (:mod:`gloro_fast.ops.registry`) as the ``triton``
implementation of the op ``gloro_fast::power_iteration_conv``: :func:`_forward` and
:func:`_backward` take exactly the op's and its backward's schema arguments (N layers
stacked on axis 0 of the iterate, which is their channel stack once reshaped to
(1, N·C_in, H, W)).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from gloro_fast.ops.convolution import conv_operator, conv_operator_adjoint, pad_input
from gloro_fast.ops.registry import register_kernels

from ._utils import MAX_GRID_YZ, acc_dtype, check_dtype, configs, contiguous, unusable_reason

__all__ = [
    "conv2d_ieee",
    "conv2d_weight_ieee",
    "normalize_segments",
    "normalize_segments_kernel",
    "scale_grids",
    "scale_segments",
    "scale_segments_kernel",
    "segment_norms",
    "segment_norms_kernel",
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
def normalize_segments_kernel(
    x_ptr, old_ptr, out_ptr, seg_len, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_l = x_l / ‖x_l‖ (out_l = old_l where ‖x_l‖ is 0 or not finite) for the l-th segment of seg_len."""
    seg = tl.program_id(0)
    acc_t = tl.float64 if FP64 else tl.float32
    base = seg.to(tl.int64) * seg_len
    offs = tl.arange(0, BLOCK)
    norm = _segment_norm(x_ptr, base, seg_len, FP64, BLOCK)
    keep_old = ((norm > 0) & (norm - norm == 0)) == 0  # 0 or not finite (norm - norm: 0 iff finite)
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
def segment_norms_kernel(y_ptr, out_ptr, seg_len, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """out_l = ‖y_l‖ for the l-th segment of seg_len elements."""
    seg = tl.program_id(0)
    norm = _segment_norm(y_ptr, seg.to(tl.int64) * seg_len, seg_len, FP64, BLOCK)
    tl.store(out_ptr + seg, norm.to(out_ptr.dtype.element_ty))


@triton.autotune(configs=configs(_SEG_CONFIGS), key=["seg_len", "FP64"])
@triton.jit
def scale_segments_kernel(
    y_ptr, g_ptr, sigma_ptr, out_ptr, seg_len, seg0, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_l = (g_l / σ_l) y_l (0 where σ_l = 0); grid (chunks, segments): the chunks of a
    segment on axis x (up to 2³¹ − 1), the segments on axis y from ``seg0`` (≤ 65,535)."""
    chunk = tl.program_id(0)
    seg = seg0 + tl.program_id(1)
    acc_t = tl.float64 if FP64 else tl.float32
    g = tl.load(g_ptr + seg).to(acc_t)
    sigma = tl.load(sigma_ptr + seg).to(acc_t)
    scale = tl.where(sigma > 0, g / tl.where(sigma > 0, sigma, 1.0), 0.0)
    kk = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = kk < seg_len
    base = seg.to(tl.int64) * seg_len
    y = tl.load(y_ptr + base + kk, mask=mask, other=0.0).to(acc_t)
    tl.store(out_ptr + base + kk, (scale * y).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- IEEE convolutions
def conv2d_ieee(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    transposed: bool,
    output_padding: Sequence[int],
) -> torch.Tensor:
    """``aten.convolution`` without bias, never in TF32: float32 CUDA tensors go to cuDNN with
    ``allow_tf32=False`` (benchmark/deterministic as torch would pass them); other dtypes and
    devices, or a disabled cuDNN, take ``aten.convolution`` (no cuDNN TF32 there)."""
    stride, padding, dilation, output_padding = (list(stride), list(padding), list(dilation),
                                                 list(output_padding))
    if input.is_cuda and input.dtype == torch.float32 and _cudnn_usable():
        benchmark = bool(torch.backends.cudnn.benchmark)
        deterministic = bool(torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled())
        x, w = input.contiguous(), weight.contiguous()
        if transposed:
            return torch.ops.aten.cudnn_convolution_transpose(
                x, w, padding, output_padding, stride, dilation, groups, benchmark, deterministic, False
            )
        return torch.ops.aten.cudnn_convolution(
            x, w, padding, stride, dilation, groups, benchmark, deterministic, False
        )
    return torch.ops.aten.convolution(
        input, weight, None, stride, padding, dilation, transposed, output_padding, groups
    )


def _cudnn_usable() -> bool:
    return torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled


def _conv2d(u, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d``'s signature (bias None), through :func:`conv2d_ieee`."""
    return conv2d_ieee(u, weight, _two(stride), _two(padding), _two(dilation), groups, False, (0, 0))


def _conv_transpose2d(v, weight, bias, stride, padding, output_padding, groups, dilation):
    """``F.conv_transpose2d``'s signature (bias None), through :func:`conv2d_ieee`."""
    return conv2d_ieee(v, weight, _two(stride), _two(padding), _two(dilation), groups, True, _two(output_padding))


def _two(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d_weight_ieee(
    padded: torch.Tensor, grad_out: torch.Tensor, weight_shape: Sequence[int],
    stride: Sequence[int], dilation: Sequence[int], groups: int,
) -> torch.Tensor:
    """∂⟨grad_out, conv(padded, K)⟩/∂K for a convolution without padding (``padded`` is the
    zero-padded input (1, groups·c_in, Hp, Wp)), as ONE convolution: with the input channels
    as the batch (c_in, groups, Hp, Wp) and grad_out as the kernels (c_out_total, 1, H', W'),
    stride = the dilation and dilation = the stride, output[c, o, a, b] = Σ_{y,x}
    grad_out[o, y, x] · padded[g(o)·c_in + c, a·dil + y·s, b·dil + x·s] = ∂/∂K[o, c, a, b]
    (cropped to the kernel size)."""
    c_out, c_in, kh, kw = weight_shape
    _, channels, hp, wp = padded.shape
    x = padded.reshape(groups, c_in, hp, wp).transpose(0, 1)
    k = grad_out.reshape(c_out, 1, grad_out.shape[2], grad_out.shape[3])
    out = conv2d_ieee(x, k, dilation, (0, 0), stride, groups, False, (0, 0))
    return out[:, :, :kh, :kw].transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------- launchers
def scale_grids(n_seg: int):
    """(seg0, segments) of each launch of the scale kernel: at most 65,535 segments on grid
    axis y per launch (the chunks of a segment are on axis x, which goes to 2³¹ − 1)."""
    return [(s0, min(MAX_GRID_YZ, n_seg - s0)) for s0 in range(0, n_seg, MAX_GRID_YZ)]


def scale_segments(y: torch.Tensor, grad_sigma: torch.Tensor, sigma: torch.Tensor, n_seg: int) -> torch.Tensor:
    """(g_l / σ_l) y_l (0 where σ_l = 0) for the n_seg equal contiguous segments of y."""
    y = contiguous(y)
    grad_sigma = contiguous(grad_sigma)
    out = torch.empty_like(y)
    seg_len = y.numel() // n_seg
    fp64 = acc_dtype(y.dtype) == torch.float64
    for seg0, count in scale_grids(n_seg):
        scale_segments_kernel[
            lambda meta, count=count: (triton.cdiv(seg_len, meta["BLOCK"]), count)
        ](y, grad_sigma, sigma, out, seg_len, seg0, FP64=fp64)
    return out


def normalize_segments(x: torch.Tensor, old: torch.Tensor, n_seg: int) -> torch.Tensor:
    """x split into n_seg equal contiguous segments, each scaled to unit norm (old kept where 0)."""
    x = contiguous(x)
    old = contiguous(old)
    out = torch.empty_like(x)
    seg_len = x.numel() // n_seg
    normalize_segments_kernel[(n_seg,)](
        x, old, out, seg_len, FP64=acc_dtype(x.dtype) == torch.float64
    )
    return out


def segment_norms(y: torch.Tensor, n_seg: int) -> torch.Tensor:
    """(n_seg,) l2 norms of the n_seg equal contiguous segments of y."""
    y = contiguous(y)
    out = torch.empty((n_seg,), dtype=y.dtype, device=y.device)
    segment_norms_kernel[(n_seg,)](
        y, out, y.numel() // n_seg, FP64=acc_dtype(y.dtype) == torch.float64
    )
    return out


def _channel_stack(iterate: torch.Tensor) -> torch.Tensor:
    """(N, C_in, H, W) → (1, N·C_in, H, W): the N layers' iterates as the channels of one input."""
    blocks, c_in, height, width = iterate.shape
    return contiguous(iterate).reshape(1, blocks * c_in, height, width)


def _forward(weight: torch.Tensor, iterate: torch.Tensor, n_iter: int, stride: List[int], padding: List[int],
             dilation: List[int], groups: int, residual: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u_new (N, C_in, H, W), sigma (N,), image (N, C_out, H', W')) for the N layers stacked on
    axis 0 (image_l = A_l u_l, + u_l with residual)."""
    check_dtype("weight", weight)
    blocks = iterate.shape[0]
    weight = contiguous(weight)
    u = _channel_stack(iterate)
    args = (tuple(stride), tuple(padding), tuple(dilation), groups * blocks)
    hw = tuple(u.shape[2:])
    if n_iter == 0:
        u = u.clone()  # outputs must not alias inputs
    for _ in range(n_iter):
        v = conv_operator(u, weight, *args, residual=residual, conv2d=_conv2d)
        x = conv_operator_adjoint(v, weight, *args, hw, residual=residual, conv_transpose2d=_conv_transpose2d)
        u = normalize_segments(x, u, blocks)
    y = contiguous(conv_operator(u, weight, *args, residual=residual, conv2d=_conv2d))
    return u.reshape(iterate.shape), segment_norms(y, blocks), y.reshape(blocks, -1, y.shape[2], y.shape[3])


def _backward(grad_sigma: torch.Tensor, weight: torch.Tensor, iterate: torch.Tensor, sigma: torch.Tensor,
              image: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
              residual: bool) -> torch.Tensor:
    """Gradient w.r.t. the stacked kernel (N·c_out, c_in/g, kh, kw) of Σ_l g_l σ_l, from the
    forward's image (not computed again)."""
    blocks = iterate.shape[0]
    u = _channel_stack(iterate)
    y = contiguous(image).reshape(1, -1, image.shape[2], image.shape[3])
    gy = scale_segments(y, grad_sigma.reshape(blocks).to(y.dtype), sigma.reshape(blocks).to(y.dtype), blocks)
    return conv2d_weight_ieee(pad_input(u, tuple(padding)), gy, weight.shape, stride, dilation, groups * blocks)


register_kernels("power_iteration_conv", "triton", forward=_forward, backward=_backward, unusable=unusable_reason)
