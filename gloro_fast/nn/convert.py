"""``from_torch``: convert a torch.nn model into gloro_fast.nn layers, copying weights."""
from __future__ import annotations

import torch
from torch import nn

from .activations import ReLU
from .base import LipschitzModule
from .containers import Flatten, Sequential
from .conv import Conv2d
from .linear import Linear
from .pooling import AvgPool2d, MaxPool2d

__all__ = ["from_torch"]


def _copy_params(dst: nn.Module, src: nn.Module) -> nn.Module:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst


def _convert_linear(m: nn.Linear) -> Linear:
    new = Linear(m.in_features, m.out_features, bias=m.bias is not None,
                 device=m.weight.device, dtype=m.weight.dtype)
    return _copy_params(new, m)


def _convert_conv(m: nn.Conv2d) -> Conv2d:
    new = Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                 m.groups, m.bias is not None, m.padding_mode, device=m.weight.device,
                 dtype=m.weight.dtype)
    return _copy_params(new, m)


def from_torch(module: nn.Module) -> LipschitzModule:
    """Convert ``module`` into the equivalent gloro_fast.nn layer(s).

    Supported: ``nn.Sequential`` (recursively), ``nn.Linear``, ``nn.Conv2d`` (zero padding),
    ``nn.ReLU``, ``nn.Flatten``, ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with disjoint windows,
    and gloro_fast layers (returned as they are). Anything else raises ``TypeError``: a
    layer without a known Lipschitz bound must never be treated as 1-Lipschitz.
    """
    if isinstance(module, LipschitzModule):
        return module
    if isinstance(module, nn.Sequential):
        return Sequential(*[from_torch(child) for child in module])
    if isinstance(module, nn.Linear):
        return _convert_linear(module)
    if isinstance(module, nn.Conv2d):
        return _convert_conv(module)
    if type(module) is nn.ReLU:
        return ReLU(inplace=module.inplace)
    if type(module) is nn.Flatten:
        return Flatten(module.start_dim, module.end_dim)
    if type(module) is nn.MaxPool2d:
        return MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                         module.return_indices, module.ceil_mode)
    if type(module) is nn.AvgPool2d:
        return AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                         module.count_include_pad, module.divisor_override)
    raise TypeError(
        f"unsupported layer {type(module).__name__}: gloro_fast knows no Lipschitz bound for it "
        "(supported: Sequential, Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, and "
        "gloro_fast.nn layers such as MinMax and LiResBlock)"
    )
