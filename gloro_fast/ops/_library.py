"""Definition of the gloro_fast ops: one ``torch.library`` op per op, plus its backward op.

:func:`define_op` gives an op its schema, its fake kernels (shapes for torch.compile), its
autograd formula and one implementation, device-generic, that runs the kernels the backend
table chose for the tensors' device (:func:`gloro_fast.ops._backend.kernels_for`). The op's
reference kernels are registered with it: the reference is the fallback on every device.

Per-call cost: each crossing between the dispatcher and Python converts every argument
(lists of tensors and ints included), several µs for the power-iteration ops. A call that
needs no autograd graph on plain CPU/CUDA tensors therefore runs the kernels straight from
the autograd kernel (:func:`_autograd_kernel`), as the redispatch to the implementation
would, without the second crossing; every other call (autograd, fake/functional tensors
under torch.compile, dispatch modes, other devices) takes the general path.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import registry
from ._backend import kernels_for

__all__ = ["define_inference_op", "define_op", "define_query_op"]

_LIBRARY = torch.library.Library("gloro_fast", "FRAGMENT")

try:  # torch's generated autograd kernel of torch.library.register_autograd (private API)
    from torch._library.autograd import Info as _AutogradInfo
    from torch._library.autograd import make_autograd_impl as _make_autograd_impl
except ImportError:  # pragma: no cover - other torch versions: register_autograd alone
    _make_autograd_impl = None

# the keysets (as the dispatcher hands them to the autograd kernel) of plain tensors of one
# device type: the backend and its autograd key, nothing else (no Python, Functionalize, Fake,
# Conjugate, functorch, ... key); raw bits → that device type
_PLAIN_KEYSETS = {torch._C.DispatchKeySet(backend).add(autograd).raw_repr(): device_type
                  for backend, autograd, device_type in (
                      (torch._C.DispatchKey.CPU, torch._C.DispatchKey.AutogradCPU, "cpu"),
                      (torch._C.DispatchKey.CUDA, torch._C.DispatchKey.AutogradCUDA, "cuda"))}


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


def _autograd_kernel(op: str, op_overload, backward: Callable, setup_context: Callable) -> Callable:
    """The Autograd kernel of ``op``: torch's kernel of ``register_autograd(op, backward,
    setup_context)``, with a shortcut for a call that builds no graph (grad mode off or no
    input requiring grad) on plain tensors of one CPU/CUDA device type (keyset in
    ``_PLAIN_KEYSETS``): there the redispatch below autograd would only reach the
    implementation, so the kernels it would run run here, below autograd, as it runs them."""
    generated = _make_autograd_impl(op_overload, _AutogradInfo(backward, setup_context))
    below_autograd = torch._C._AutoDispatchBelowAutograd
    is_grad_enabled, any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad
    plain = _PLAIN_KEYSETS
    # requires_grad is looked for up to the last tensor argument (what follows: ints, floats, bools)
    tensors = 1 + max(i for i, a in enumerate(op_overload._schema.arguments) if "Tensor" in str(a.type))

    def autograd_kernel(keyset, *args, **kwargs):
        device_type = plain.get(keyset.raw_repr())
        if (device_type is not None and not kwargs and (type(args[0]) is not list or args[0])
                and not (is_grad_enabled() and any_requires_grad(*args[:tensors]))):
            with below_autograd():
                return kernels_for(op, device_type).forward(*args)
        return generated(keyset, *args, **kwargs)

    autograd_kernel.__name__ = f"{op}_autograd"
    return autograd_kernel


def define_op(op: str, schema: str, backward_schema: str, *, fake: Callable, fake_backward: Callable,
              setup_context: Callable, backward: Callable, reference_forward: Callable,
              reference_backward: Callable, tags: tuple = ()):
    """Define ``gloro_fast::<op>`` and ``gloro_fast::<op>_backward`` (``schema`` and
    ``backward_schema`` are their signatures, from the parenthesis on; ``tags``: torch tags
    of both, e.g. ``torch.Tag.flexible_layout`` for an op whose kernels take the layouts
    torch.compile chooses) and register the reference kernels. Returns the two
    ``OpOverload``s."""
    backward_op = f"{op}_backward"
    _LIBRARY.define(op + schema, tags=tags)
    _LIBRARY.define(backward_op + backward_schema, tags=tags)
    # CompositeExplicitAutograd: one implementation for every device, below autograd
    _LIBRARY.impl(op, _forward_impl(op), "CompositeExplicitAutograd")
    _LIBRARY.impl(backward_op, _backward_impl(op), "CompositeExplicitAutograd")
    torch.library.register_fake(f"gloro_fast::{op}", fake, lib=_LIBRARY)
    torch.library.register_fake(f"gloro_fast::{backward_op}", fake_backward, lib=_LIBRARY)
    ops = torch.ops.gloro_fast
    op_overload = getattr(ops, op).default
    if _make_autograd_impl is None:  # pragma: no cover
        torch.library.register_autograd(f"gloro_fast::{op}", backward, setup_context=setup_context, lib=_LIBRARY)
    else:  # what register_autograd registers, with the shortcut
        _LIBRARY.impl(op, _autograd_kernel(op, op_overload, backward, setup_context), "Autograd", with_keyset=True)
    registry.register_kernels(op, "reference", forward=reference_forward, backward=reference_backward)
    return op_overload, getattr(ops, backward_op).default


def _no_backward(op: str) -> Callable:
    def backward(*args):
        raise RuntimeError(f"gloro_fast::{op} has no backward: it answers a question about its inputs")

    backward.__name__ = f"{op}_no_backward"
    return backward


def define_query_op(op: str, schema: str, *, reference: Callable, tags: tuple = ()):
    """Define ``gloro_fast::<op>``, an op that answers a question about its tensors (its
    output is no tensor: no autograd, no fake kernel, not traceable by torch.compile), and
    register its reference kernel. Its kernels are chosen per backend like every op's (the
    registry's backward entry raises); ``tags``: torch tags of the op (e.g.
    ``torch.Tag.flexible_layout``). Returns the ``OpOverload``."""
    _LIBRARY.define(op + schema, tags=tags)
    _LIBRARY.impl(op, _forward_impl(op), "CompositeExplicitAutograd")
    registry.register_kernels(op, "reference", forward=reference, backward=_no_backward(op))
    return getattr(torch.ops.gloro_fast, op).default


def define_inference_op(op: str, schema: str, *, fake: Callable, reference: Callable, tags: tuple = ()):
    """Define ``gloro_fast::<op>``, an op whose outputs are decisions, never differentiated
    (its callers pass detached tensors): no autograd formula, no backward op, a fake
    kernel for torch.compile; register its reference kernel. Returns the ``OpOverload``.
    A query op (:func:`define_query_op`) with a fake kernel: its outputs are tensors."""
    overload = define_query_op(op, schema, reference=reference, tags=tags)
    torch.library.register_fake(f"gloro_fast::{op}", fake, lib=_LIBRARY)
    return overload
