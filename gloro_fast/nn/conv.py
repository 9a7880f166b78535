"""Convolutions with power-iterated operator-norm bounds: Conv2d and LiResBlock."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_input_shape
from ..ops import power_iteration_conv
from ..ops.convolution import conv_operator, normalize_padding
from ..sound.conv import conv_abs_norm_upper, conv_geometry, conv_norm_upper
from ..sound.forward_error import affine_layer
from ..sound.rounding import U64, gamma, up
from .base import PowerIterationModule, WeightInit, float64_scalar

__all__ = ["Conv2d", "LiResBlock", "channels_last", "same_padding"]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in the channels_last layout, the same values: for one channel the same
    memory viewed with channels_last strides (for C = 1 both layouts are one order of the
    bytes, and oneDNN, which reads the strides, then keeps its outputs channels_last), else
    a channels_last copy (x is left as it is).

    The certifying pass (``GloroNet`` on the CPU) and the frozen model run their
    convolutions on it: oneDNN's channels_last convolutions skip the reorders to its blocked
    layout and back that an NCHW tensor costs, and the outputs stay channels_last through
    MinMax, pooling and residual blocks (6C2F, B = 256, 2 cores: 150 -> 108 ms a certify
    call). The values are the same function of x, summed in another order: the rounding
    allowance holds for any order."""
    if x.shape[1] == 1:
        x = x.contiguous()
        return x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x.contiguous(memory_format=torch.channels_last)


def same_padding(input_hw, kernel_size, stride, dilation) -> Tuple[int, int, int, int]:
    """TensorFlow "same" zero padding (top, bottom, left, right): output size ⌈H/s⌉,
    the odd pixel of an uneven total on the bottom/right (as torch does for stride 1)."""
    pads = []
    for size, k, s, d in zip(input_hw, kernel_size, stride, dilation):
        out = -(-size // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


@functools.lru_cache(maxsize=256)
def _pads(padding, input_hw, kernel_size, stride, dilation) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of a layer's ``padding`` setting for inputs of size
    ``input_hw``, memoised by the settings' values: a forward asks for the same few on
    every call."""
    if padding == "same":
        return same_padding(input_hw, kernel_size, stride, dilation)
    if padding == "valid":
        return (0, 0, 0, 0)
    return normalize_padding(padding)


class Conv2d(WeightInit, nn.Conv2d, PowerIterationModule):
    """``torch.nn.Conv2d`` whose bound is σ̂ of the real convolution operator.

    The operator is the zero-padded, strided, dilated, grouped convolution on the actual
    input size (C_in, H, W), which the layer learns at its first forward or from
    ``input_shape=(C_in, H, W)``; a later input of another size is an error, since the
    bound would not hold for it. ``padding`` accepts what torch does plus ``"same"`` with
    any stride (TensorFlow convention) and explicit (top, bottom, left, right) tuples.
    Only ``padding_mode="zeros"`` is supported.
    """

    residual = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, input_shape: Optional[Sequence[int]] = None,
                 init: str = "orthogonal") -> None:
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode must be 'zeros' (the bound is derived for zero padding), got {padding_mode!r}"
            )
        self._set_init(init)
        explicit4 = isinstance(padding, (tuple, list)) and len(padding) == 4
        torch_padding = 0 if isinstance(padding, str) or explicit4 else padding
        super().__init__(in_channels, out_channels, kernel_size, stride, torch_padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
            self.padding = padding
        elif explicit4:
            self.padding = normalize_padding(padding)
        self._init_iterate(None, device=self.weight.device, dtype=self.weight.dtype)
        if input_shape is not None:
            self.set_input_shape(input_shape)

    # -- geometry -----------------------------------------------------------------
    def pads_for(self, input_hw) -> Tuple[int, int, int, int]:
        """Zero padding (top, bottom, left, right) applied to inputs of size input_hw."""
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        args = (padding, tuple(input_hw), tuple(self.kernel_size), tuple(self.stride), tuple(self.dilation))
        if torch.compiler.is_compiling():  # traced once: Dynamo warns about a cache wrapper
            return _pads.__wrapped__(*args)
        return _pads(*args)

    @property
    def input_shape(self) -> Optional[Tuple[int, int, int]]:
        return tuple(self.power_iterate.shape[1:]) if self.iterate_initialized else None

    def set_input_shape(self, input_shape: Sequence[int]) -> None:
        """Fix the input size (C_in, H, W) the operator acts on, initialising the iterate."""
        input_shape = check_input_shape(input_shape, ndim=3, channels=self.in_channels)
        if self.input_shape is not None and self.input_shape != input_shape:
            raise ValueError(
                f"{type(self).__name__} is bound for inputs of shape {self.input_shape}, got "
                f"{input_shape}; its Lipschitz bound would not hold for another size"
            )
        if self.input_shape is None:
            self._init_iterate((1,) + input_shape, device=self.weight.device, dtype=self.weight.dtype)

    # -- forward and bound --------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if len(shape) != 4:
            raise ValueError(
                f"input must have shape (N, {self.in_channels}, H, W), got {tuple(shape)}"
            )
        # the operator's input size is fixed at the first forward: the full check (6 µs, a
        # tenth of a one-sample convolution) runs only when the stored iterate (1, C, H, W)
        # does not already have x's sample shape and this layer's channels (an iterate not
        # initialised yet has no such shape)
        iterate = self._buffers.get("power_iterate")
        if iterate is None or iterate.shape[1:] != shape[1:] or shape[1] != self.in_channels:
            self.set_input_shape(shape[1:])
        top, bottom, left, right = self.pads_for(shape[2:])
        # the bias goes into the convolution's epilogue, as torch.nn.Conv2d does (a separate
        # add is one more pass over the output); zero padding into its own argument when it
        # is symmetric
        if top == bottom and left == right:
            out = F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        else:
            out = F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                           self.dilation, self.groups)
        return out + x if self.residual else out

    def _power_step(self, n_iter: int, u: torch.Tensor):
        return power_iteration_conv(
            self.weight, u, n_iter, stride=self.stride,
            padding=self.pads_for(self.power_iterate.shape[2:]), dilation=self.dilation,
            groups=self.groups, residual=self.residual,
        )

    # -- provable bounds -----------------------------------------------------------
    def _geometry(self):
        self._require_iterate()
        shape = self.input_shape
        return shape, self.pads_for(shape[1:])

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> torch.Tensor:
        """Provable bound of the operator norm on the layer's input size
        (:func:`gloro_fast.sound.conv.conv_norm_upper`)."""
        shape, pads = self._geometry()
        return float64_scalar(conv_norm_upper(self.weight, shape, self.stride, pads, self.dilation,
                                              self.groups, self.residual))

    @torch.no_grad()
    def _abs_norm(self) -> float:
        shape, pads = self._geometry()
        return conv_abs_norm_upper(self.weight, shape, self.stride, pads, self.dilation,
                                   self.groups, self.residual)

    @torch.no_grad()
    def _apply_float64(self, u: torch.Tensor):
        shape, pads = self._geometry()
        w = self.weight.detach().to(device="cpu", dtype=torch.float64)
        x = u.reshape((1,) + tuple(shape))
        out = conv_operator(x, w, self.stride, pads, self.dilation, self.groups, residual=self.residual)
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1] + 1
        err = up(gamma(fan_in, U64) * up(self._abs_norm() * float(torch.linalg.vector_norm(u))))
        return out, err

    @torch.no_grad()
    def forward_bound(self, bound, arith, upper_of):
        shape, pads = self._geometry()
        if tuple(bound.shape) != tuple(shape):
            raise ValueError(
                f"{type(self).__name__} is bound for inputs of shape {shape}, but the layers "
                f"before it produce samples of shape {tuple(bound.shape)}"
            )
        g = conv_geometry(self.weight.shape, shape, self.stride, pads, self.dilation, self.groups,
                          self.residual)
        offset = 0.0
        if self.bias is not None:
            b = self.bias.detach().to(device="cpu", dtype=torch.float64)
            offset = up(float(torch.linalg.vector_norm(b)) * (1.0 + gamma(b.numel(), U64))
                        * math.sqrt(g.out_height * g.out_width))
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        # the bias add, the residual add, and a margin of one rounding
        additions = 2 + (1 if self.residual else 0)
        return affine_layer(bound, (g.c_out, g.out_height, g.out_width), upper_of(self),
                            self._abs_norm(), fan_in, offset, arith, additions=additions)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", input_shape={self.input_shape}" if self.input_shape else "")


class LiResBlock(Conv2d):
    """LiResNet block y = x + conv(x) (Hu et al. 2023): a linear map, so its bound is
    σ̂(I + conv) by power iteration on the sum, tighter than 1 + ‖conv‖.

    The convolution keeps the shape: ``channels`` in and out, stride 1, "same" padding.
    """

    residual = True

    def __init__(self, channels: int, kernel_size=3, bias: bool = True, dilation=1,
                 device=None, dtype=None, input_shape: Optional[Sequence[int]] = None,
                 init: str = "orthogonal") -> None:
        super().__init__(channels, channels, kernel_size, stride=1, padding="same",
                         dilation=dilation, bias=bias, device=device, dtype=dtype,
                         input_shape=input_shape, init=init)
