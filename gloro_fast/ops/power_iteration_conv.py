"""``power_iteration_conv(weight, u, n_iter, ...)``: operator norm of a convolution.

The operator is the real convolution A: R^{c_in×H×W} → R^{c_out×H'×W'} on the actual
input size (zero padding, stride, dilation, groups), or I + A for a LiResNet block
(``residual=True``). Its adjoint is ``conv_transpose2d`` with the output padding that
restores H×W, followed by a crop when the zero padding is asymmetric.

    repeat n_iter times (no autograd):  u ← Aᵀ A u / ‖Aᵀ A u‖
    σ̂ = ‖A u‖                           (autograd w.r.t. the kernel only)
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._validation import check_positive_int, check_tensor
from ._backend import resolve_backend
from ._power_iteration_common import normalize_iterate

__all__ = [
    "power_iteration_conv",
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


def conv_operator(u, weight, stride, pads: Pads, dilation, groups, residual=False):
    """A u: the linear part of the convolution on u (N, c_in, H, W)."""
    top, bottom, left, right = pads
    if top == bottom and left == right:
        out = F.conv2d(u, weight, None, stride, (top, left), dilation, groups)
    else:
        out = F.conv2d(F.pad(u, (left, right, top, bottom)), weight, None, stride, 0, dilation, groups)
    return out + u if residual else out


def conv_operator_adjoint(v, weight, stride, pads: Pads, dilation, groups, input_hw, residual=False):
    """Aᵀ v for the operator of :func:`conv_operator` on inputs of spatial size input_hw."""
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
    out = F.conv_transpose2d(v, weight, None, stride, pad_arg, tuple(out_pad), groups, dilation)
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
    check_tensor("weight", weight, ndim=4, floating=True)
    check_tensor("iterate", iterate, ndim=4, floating=True)
    n_iter = check_positive_int("n_iter", n_iter, allow_zero=True)
    groups = check_positive_int("groups", groups)
    stride, dilation, pads = _pair(stride, "stride"), _pair(dilation, "dilation"), _pads(padding)
    c_out, c_in_g = weight.shape[:2]
    if iterate.shape[0] != 1 or iterate.shape[1] != c_in_g * groups:
        raise ValueError(
            f"iterate must have shape (1, {c_in_g * groups}, H, W) for weight {tuple(weight.shape)} "
            f"and groups={groups}, got {tuple(iterate.shape)}"
        )
    if c_out % groups:
        raise ValueError(f"groups={groups} must divide the {c_out} output channels of weight")
    if iterate.device != weight.device or iterate.dtype != weight.dtype:
        raise ValueError(
            f"iterate must match weight in dtype and device, got {iterate.dtype}/{iterate.device} "
            f"vs {weight.dtype}/{weight.device}"
        )
    for axis, name in enumerate(("height", "width")):
        size = iterate.shape[2 + axis] + pads[2 * axis] + pads[2 * axis + 1]
        if size < dilation[axis] * (weight.shape[2 + axis] - 1) + 1:
            raise ValueError(
                f"padded input {name} {size} is smaller than the dilated kernel of weight "
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
    backend = resolve_backend(weight.device)
    if backend != "reference":  # pragma: no cover
        raise RuntimeError(f"unknown backend {backend!r}")
    return power_iteration_conv_reference(
        weight, iterate, n_iter, stride, pads, dilation, groups, residual
    )
