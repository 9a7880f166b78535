"""The convolution operator whose norm ``power_iteration_conv`` estimates, and its adjoint.

A: R^{c_in×H×W} → R^{c_out×H'×W'} is the real convolution on the actual input size (zero
padding, stride, dilation, groups), or I + A for a LiResNet block (``residual=True``). Its
adjoint is ``conv_transpose2d`` with the output padding that restores H×W, followed by a crop
when the zero padding is asymmetric. Padding is always given as (top, bottom, left, right)
here (:func:`normalize_padding` turns the accepted forms into that).

Shared by the reference op, the Triton kernels (which pass their own IEEE convolutions), the
layers and the sound bounds; it imports nothing from gloro_fast.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["Padding", "conv_operator", "conv_operator_adjoint", "normalize_padding", "pad_input", "pair"]

Padding = Tuple[int, int, int, int]  # (top, bottom, left, right)


def pair(value, name: str) -> Tuple[int, int]:
    """An int or a pair of ints ≥ 1 (stride, dilation) as a pair."""
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


def normalize_padding(padding) -> Padding:
    """Zero padding as (top, bottom, left, right), from an int, a pair (pad_h, pad_w) or a
    4-tuple."""
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


def pad_input(u: torch.Tensor, padding: Padding) -> torch.Tensor:
    """u with its zero padding made explicit (what a convolution without padding sees)."""
    top, bottom, left, right = padding
    return F.pad(u, (left, right, top, bottom))


def _symmetric(padding: Padding) -> bool:
    # a library convolution pads both sides equally: anything else is padded explicitly
    top, bottom, left, right = padding
    return top == bottom and left == right


def conv_operator(u, weight, stride, padding: Padding, dilation, groups, residual=False, conv2d=None):
    """A u: the linear part of the convolution on u (N, c_in, H, W). ``conv2d`` (default
    ``F.conv2d``) lets a backend pick the convolution (e.g. one that never uses TF32)."""
    conv2d = F.conv2d if conv2d is None else conv2d
    if _symmetric(padding):
        out = conv2d(u, weight, None, stride, (padding[0], padding[2]), dilation, groups)
    else:
        out = conv2d(pad_input(u, padding), weight, None, stride, 0, dilation, groups)
    return out + u if residual else out


def conv_operator_adjoint(v, weight, stride, padding: Padding, dilation, groups, input_hw, residual=False,
                          conv_transpose2d=None):
    """Aᵀ v for the operator of :func:`conv_operator` on inputs of spatial size input_hw
    (``conv_transpose2d`` as ``conv2d`` there)."""
    conv_transpose2d = F.conv_transpose2d if conv_transpose2d is None else conv_transpose2d
    top, bottom, left, right = padding
    height, width = input_hw
    symmetric = _symmetric(padding)
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
