"""``power_iteration_conv(weight, u, n_iter, ...)``: operator norm of a convolution.

The operator is the real convolution A: R^{c_in×H×W} → R^{c_out×H'×W'} on the actual
input size (zero padding, stride, dilation, groups), or I + A for a LiResNet block
(``residual=True``). Its adjoint is ``conv_transpose2d`` with the output padding that
restores H×W, followed by a crop when the zero padding is asymmetric.

    repeat n_iter times (no autograd):  u ← Aᵀ A u / ‖Aᵀ A u‖
    σ̂ = ‖A u‖                           (autograd w.r.t. the kernel only)

Layers of one configuration (kernel shape, stride, padding, dilation, groups, residual,
iterate shape — e.g. the blocks of a LiResNet) can run together with
:func:`power_iteration_conv_batched`: their iterates stacked on the channel axis and their
kernels on the output axis make ONE grouped convolution (groups × layers), normalised per
layer.

Backends: ``reference`` (below) and ``cpp``: the compiled custom ops
``torch.ops.gloro_fast.power_iteration_conv`` / ``power_iteration_conv_backward`` (library
convolutions with fused normalisation/norm epilogues, csrc/cpu and csrc/cuda), made
differentiable and traceable here with ``register_autograd`` and ``register_fake``. The
compiled op takes the iterate as (N, C_in, H, W) for N layers whose kernels are stacked in
the weight (N·C_out, C_in/groups, kh, kw), and returns σ̂ of shape (N,).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._validation import check_positive_int, check_tensor
from ._extension import register_op, resolve
from ._power_iteration_common import normalize_iterate

__all__ = [
    "power_iteration_conv",
    "power_iteration_conv_batched",
    "power_iteration_conv_batched_reference",
    "power_iteration_conv_reference",
    "conv_operator",
    "conv_operator_adjoint",
]

Pads = Tuple[int, int, int, int]  # (top, bottom, left, right)


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {tuple(value)}")
    return tuple(value)


def _pads(padding) -> Pads:
    if isinstance(padding, int) and not isinstance(padding, bool):
        padding = (padding,) * 4
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    if (
        not isinstance(padding, (tuple, list))
        or len(padding) != 4
        or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in padding)
    ):
        raise ValueError(
            "padding must be a non-negative int, a pair (pad_h, pad_w) or a 4-tuple "
            f"(top, bottom, left, right), got {padding!r}"
        )
    return tuple(padding)


def conv_operator(u, weight, stride, pads: Pads, dilation, groups, residual=False, conv2d=None):
    """A u: the linear part of the convolution on u (N, c_in, H, W). ``conv2d`` (default
    ``F.conv2d``) lets a backend pick the convolution (e.g. one that never uses TF32)."""
    conv2d = F.conv2d if conv2d is None else conv2d
    top, bottom, left, right = pads
    if top == bottom and left == right:
        out = conv2d(u, weight, None, stride, (top, left), dilation, groups)
    else:
        out = conv2d(F.pad(u, (left, right, top, bottom)), weight, None, stride, 0, dilation, groups)
    return out + u if residual else out


def conv_operator_adjoint(v, weight, stride, pads: Pads, dilation, groups, input_hw, residual=False,
                          conv_transpose2d=None):
    """Aᵀ v for the operator of :func:`conv_operator` on inputs of spatial size input_hw
    (``conv_transpose2d`` as ``conv2d`` there)."""
    conv_transpose2d = F.conv_transpose2d if conv_transpose2d is None else conv_transpose2d
    top, bottom, left, right = pads
    height, width = input_hw
    symmetric = top == bottom and left == right
    # conv_transpose2d's output size before output_padding, for the padded input
    pad_arg = (top, left) if symmetric else (0, 0)
    target = (height, width) if symmetric else (height + top + bottom, width + left + right)
    out_pad = []
    for axis in range(2):
        k = weight.shape[2 + axis]
        base = (v.shape[2 + axis] - 1) * stride[axis] - 2 * pad_arg[axis] + dilation[axis] * (k - 1) + 1
        out_pad.append(target[axis] - base)
    out = conv_transpose2d(v, weight, None, stride, pad_arg, tuple(out_pad), groups, dilation)
    if not symmetric:
        out = out[:, :, top : top + height, left : left + width]
    return out + v if residual else out


def power_iteration_conv_reference(
    weight, iterate, n_iter, stride, pads, dilation, groups, residual
):
    args = (stride, pads, dilation, groups)
    hw = iterate.shape[2:]
    u = iterate
    with torch.no_grad():
        w = weight.detach()
        for _ in range(n_iter):
            v = conv_operator(u, w, *args, residual=residual)
            u = normalize_iterate(conv_operator_adjoint(v, w, *args, hw, residual=residual), u)
    sigma = torch.linalg.vector_norm(conv_operator(u, weight, *args, residual=residual))
    return u, sigma


def _check_conv(weight, iterate, n_iter, stride, padding, dilation, groups, residual,
                wname="weight", uname="iterate"):
    """Validate one layer's arguments; returns (n_iter, stride, pads, dilation, groups)."""
    check_tensor(wname, weight, ndim=4, floating=True)
    check_tensor(uname, iterate, ndim=4, floating=True)
    n_iter = check_positive_int("n_iter", n_iter, allow_zero=True)
    groups = check_positive_int("groups", groups)
    stride, dilation, pads = _pair(stride, "stride"), _pair(dilation, "dilation"), _pads(padding)
    c_out, c_in_g = weight.shape[:2]
    if iterate.shape[0] != 1 or iterate.shape[1] != c_in_g * groups:
        raise ValueError(
            f"{uname} must have shape (1, {c_in_g * groups}, H, W) for {wname} {tuple(weight.shape)} "
            f"and groups={groups}, got {tuple(iterate.shape)}"
        )
    if c_out % groups:
        raise ValueError(f"groups={groups} must divide the {c_out} output channels of {wname}")
    if iterate.device != weight.device or iterate.dtype != weight.dtype:
        raise ValueError(
            f"{uname} must match {wname} in dtype and device, got {iterate.dtype}/{iterate.device} "
            f"vs {weight.dtype}/{weight.device}"
        )
    for axis, name in enumerate(("height", "width")):
        size = iterate.shape[2 + axis] + pads[2 * axis] + pads[2 * axis + 1]
        if size < dilation[axis] * (weight.shape[2 + axis] - 1) + 1:
            raise ValueError(
                f"padded input {name} {size} is smaller than the dilated kernel of {wname} "
                f"{tuple(weight.shape)}"
            )
    if residual:
        out = [
            (iterate.shape[2 + a] + pads[2 * a] + pads[2 * a + 1] - dilation[a] * (weight.shape[2 + a] - 1) - 1)
            // stride[a] + 1
            for a in range(2)
        ]
        if c_out != iterate.shape[1] or tuple(out) != tuple(iterate.shape[2:]):
            raise ValueError(
                "residual=True needs a convolution whose output shape equals its input shape "
                f"{tuple(iterate.shape[1:])}, got ({c_out}, {out[0]}, {out[1]})"
            )
    return n_iter, stride, pads, dilation, groups


def power_iteration_conv(
    weight: torch.Tensor,
    iterate: torch.Tensor,
    n_iter: int = 1,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    residual: bool = False,
):
    """Power iteration on a 2-d convolution operator (or I + conv).

    Args:
        weight: kernel (c_out, c_in / groups, kh, kw).
        iterate: unit-norm u of shape (1, c_in, H, W); its H×W is the input size
            the operator acts on.
        n_iter: iterations before the estimate (0: estimate with the given u).
        stride, dilation: int or pair. padding: int, (pad_h, pad_w) or
            (top, bottom, left, right) zero padding.
        groups: channel groups, dividing c_in and c_out.
        residual: estimate ‖I + A‖ instead of ‖A‖ (needs output shape = input shape).

    Returns:
        ``(u_new, sigma)``: u_new detached, sigma 0-dim, differentiable w.r.t. weight.
    """
    n_iter, stride, pads, dilation, groups = _check_conv(
        weight, iterate, n_iter, stride, padding, dilation, groups, residual
    )
    residual = bool(residual)
    backend = resolve("power_iteration_conv", weight.device.type)
    if backend == "reference":
        return power_iteration_conv_reference(
            weight, iterate, n_iter, stride, pads, dilation, groups, residual
        )
    if backend == "cpp":
        u, sigma = torch.ops.gloro_fast.power_iteration_conv(
            weight, iterate, n_iter, list(stride), list(pads), list(dilation), groups, residual
        )
        return u, sigma.reshape(())
    if backend == "triton":
        from ..kernels import power_iteration_conv as triton_kernels

        return triton_kernels.power_iteration_conv(
            weight, iterate, n_iter, stride, pads, dilation, groups, residual
        )
    raise RuntimeError(f"unknown backend {backend!r}")  # pragma: no cover - guarded by set_backend


def _normalize_blocks(new: torch.Tensor, old: torch.Tensor, blocks: int) -> torch.Tensor:
    """Per-layer :func:`normalize_iterate` of (1, blocks·C, H, W) channel-stacked iterates."""
    flat_new, flat_old = new.reshape(blocks, -1), old.reshape(blocks, -1)
    norm = torch.linalg.vector_norm(flat_new, dim=1, keepdim=True)
    out = torch.where(norm > 0, flat_new / norm.clamp_min(torch.finfo(new.dtype).tiny), flat_old)
    return out.reshape(new.shape)


def power_iteration_conv_batched_reference(
    weight, iterate, n_iter, stride, pads, dilation, groups, residual
):
    """Reference of the batched op: ``iterate`` (N, C_in, H, W) holds N layers' iterates,
    ``weight`` (N·C_out, C_in/groups, kh, kw) their kernels stacked on the output axis.
    One grouped convolution (groups·N) on the channel-stacked iterate, normalised per
    layer. Returns (u_new (N, C_in, H, W), sigma (N,))."""
    blocks, c_in, height, width = iterate.shape
    args = (stride, pads, dilation, groups * blocks)
    u = iterate.reshape(1, blocks * c_in, height, width)
    with torch.no_grad():
        w = weight.detach()
        for _ in range(n_iter):
            v = conv_operator(u, w, *args, residual=residual)
            x = conv_operator_adjoint(v, w, *args, (height, width), residual=residual)
            u = _normalize_blocks(x, u, blocks)
    out = conv_operator(u, weight, *args, residual=residual)
    sigma = torch.linalg.vector_norm(out.reshape(blocks, -1), dim=1)
    return u.reshape(blocks, c_in, height, width), sigma


def _check_batched(weights, iterates, n_iter, stride, padding, dilation, groups, residual):
    """Validate the arguments of :func:`power_iteration_conv_batched` (shared with the Triton
    entry ``gloro_fast.kernels``); returns ``(weights, iterates, checked)`` with lists and
    ``checked`` = ``(n_iter, stride, pads, dilation, groups)`` (None for no layers)."""
    weights, iterates = list(weights), list(iterates)
    if len(weights) != len(iterates):
        raise ValueError(
            f"weights and iterates must have the same length, got {len(weights)} and {len(iterates)}"
        )
    checked = None
    for k, (w, u) in enumerate(zip(weights, iterates)):
        checked = _check_conv(w, u, n_iter, stride, padding, dilation, groups, residual,
                              wname=f"weights[{k}]", uname=f"iterates[{k}]")
        if k and (w.shape != weights[0].shape or w.dtype != weights[0].dtype or w.device != weights[0].device):
            raise ValueError(
                f"weights[{k}] must match weights[0] in shape, dtype and device, got "
                f"{tuple(w.shape)}/{w.dtype}/{w.device} vs "
                f"{tuple(weights[0].shape)}/{weights[0].dtype}/{weights[0].device}"
            )
        if k and u.shape != iterates[0].shape:
            raise ValueError(
                f"iterates[{k}] must match iterates[0] in shape, got {tuple(u.shape)} vs "
                f"{tuple(iterates[0].shape)}"
            )
    if not weights:
        check_positive_int("n_iter", n_iter, allow_zero=True)
    return weights, iterates, checked


def power_iteration_conv_batched(
    weights: Sequence[torch.Tensor],
    iterates: Sequence[torch.Tensor],
    n_iter: int = 1,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    residual: bool = False,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """:func:`power_iteration_conv` on several layers of ONE configuration at once.

    All ``weights`` share one shape, dtype and device, all ``iterates`` one shape (1, C_in,
    H, W), and the convolution arguments apply to every layer. The layers run as one
    grouped convolution (kernels stacked on the output axis, iterates on the channel axis,
    groups × layers) with per-layer normalisation: the same result as one call per layer.

    Returns:
        ``(list of u_new, list of sigma)``: as :func:`power_iteration_conv` per layer.
    """
    weights, iterates, checked = _check_batched(
        weights, iterates, n_iter, stride, padding, dilation, groups, residual
    )
    if not weights:
        return [], []
    n_iter, stride, pads, dilation, groups = checked
    residual = bool(residual)
    backend = resolve("power_iteration_conv", weights[0].device.type)
    if backend == "triton":
        from ..kernels import power_iteration_conv as triton_kernels

        return triton_kernels.power_iteration_conv_batched(
            weights, iterates, n_iter, stride, pads, dilation, groups, residual
        )
    weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    iterate = iterates[0] if len(iterates) == 1 else torch.cat(iterates, dim=0)
    if backend == "reference":
        u, sigma = power_iteration_conv_batched_reference(
            weight, iterate, n_iter, stride, pads, dilation, groups, residual
        )
    elif backend == "cpp":
        u, sigma = torch.ops.gloro_fast.power_iteration_conv(
            weight, iterate, n_iter, list(stride), list(pads), list(dilation), groups, residual
        )
    else:  # pragma: no cover - guarded by set_backend
        raise RuntimeError(f"unknown backend {backend!r}")
    return list(u.split(1, dim=0)), list(sigma.unbind(0))


# ---- registration of the compiled ops (only when gloro_fast._C loaded, only once) ----


def _fake_power_iteration_conv(weight, iterate, n_iter, stride, padding, dilation, groups, residual):
    return iterate.new_empty(iterate.shape), iterate.new_empty((iterate.shape[0],))


def _fake_power_iteration_conv_backward(grad_sigma, weight, iterate, sigma, stride, padding, dilation,
                                        groups, residual):
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    weight, _iterate, _n_iter, stride, padding, dilation, groups, residual = inputs
    u, sigma = output
    ctx.mark_non_differentiable(u)
    ctx.conv_args = (stride, padding, dilation, groups, residual)
    ctx.save_for_backward(weight, u, sigma)


def _backward(ctx, grad_u, grad_sigma):
    weight, u, sigma = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0]:
        if grad_sigma is None:
            grad_sigma = torch.zeros_like(sigma)
        if torch.is_grad_enabled():
            # create_graph (double backward): the same gradient by differentiable torch ops,
            # with σ̂ = ‖A u‖ recomputed as a function of the kernel
            stride, padding, dilation, groups, residual = ctx.conv_args
            blocks, c_in, height, width = u.shape
            with torch.enable_grad():
                w = weight if weight.requires_grad else weight.detach().requires_grad_(True)
                out = conv_operator(u.reshape(1, blocks * c_in, height, width), w, tuple(stride),
                                    tuple(padding), tuple(dilation), groups * blocks, residual=residual)
                sigmas = torch.linalg.vector_norm(out.reshape(blocks, -1), dim=1)
                (grad_weight,) = torch.autograd.grad(sigmas, w, grad_sigma, create_graph=True)
        else:
            grad_weight = torch.ops.gloro_fast.power_iteration_conv_backward(
                grad_sigma, weight, u, sigma, *ctx.conv_args
            )
    return grad_weight, None, None, None, None, None, None, None


register_op(
    "power_iteration_conv",
    fake=_fake_power_iteration_conv,
    fake_backward=_fake_power_iteration_conv_backward,
    backward=_backward,
    setup_context=_setup_context,
)
