"""Definition of the gloro_fast ops: one ``torch.library`` op per op, plus its backward op.

:func:`define_op` gives an op its schema, its fake kernels (shapes for torch.compile), its
autograd formula and one implementation, device-generic, that runs the kernels the backend
table chose for the tensors' device (:func:`gloro_fast.ops._backend.kernels_for`). The op's
reference kernels are registered with it: the reference is the fallback on every device.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import registry
from ._backend import kernels_for

__all__ = ["define_op"]

_LIBRARY = torch.library.Library("gloro_fast", "FRAGMENT")


def _device_type(first) -> str:
    """Device type of an op's first argument: a tensor, or a list of them (one device)."""
    return (first[0] if isinstance(first, (list, tuple)) else first).device.type


def _forward_impl(op: str) -> Callable:
    def forward(*args):
        return kernels_for(op, _device_type(args[0])).forward(*args)

    forward.__name__ = f"{op}_impl"
    return forward


def _backward_impl(op: str) -> Callable:
    def backward(*args):
        return kernels_for(op, _device_type(args[0])).backward(*args)

    backward.__name__ = f"{op}_backward_impl"
    return backward


def define_op(op: str, schema: str, backward_schema: str, *, fake: Callable, fake_backward: Callable,
              setup_context: Callable, backward: Callable, reference_forward: Callable,
              reference_backward: Callable):
    """Define ``gloro_fast::<op>`` and ``gloro_fast::<op>_backward`` (``schema`` and
    ``backward_schema`` are their signatures, from the parenthesis on) and register the
    reference kernels. Returns the two ``OpOverload``s."""
    backward_op = f"{op}_backward"
    _LIBRARY.define(op + schema)
    _LIBRARY.define(backward_op + backward_schema)
    # CompositeExplicitAutograd: one implementation for every device, below autograd
    _LIBRARY.impl(op, _forward_impl(op), "CompositeExplicitAutograd")
    _LIBRARY.impl(backward_op, _backward_impl(op), "CompositeExplicitAutograd")
    torch.library.register_fake(f"gloro_fast::{op}", fake, lib=_LIBRARY)
    torch.library.register_fake(f"gloro_fast::{backward_op}", fake_backward, lib=_LIBRARY)
    torch.library.register_autograd(f"gloro_fast::{op}", backward, setup_context=setup_context, lib=_LIBRARY)
    registry.register_kernels(op, "reference", forward=reference_forward, backward=reference_backward)
    ops = torch.ops.gloro_fast
    return getattr(ops, op).default, getattr(ops, backward_op).default
