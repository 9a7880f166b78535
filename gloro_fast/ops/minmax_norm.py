"""``minmax_norm(x)``: MinMax and each sample's sum of squares, in one pass.

For x (N, C, ...) with channel halves a = x[:, :C/2], b = x[:, C/2:]:

    out = [min(a, b), max(a, b)]         (N, C, ...), x's dtype (NaN propagates, as torch.minimum)
    sumsq_n = Σ x_n²                     (N,), float64, summed in any order

MinMax permutes each pair, so ‖out_n‖ = ‖x_n‖: the certifying pass reads the norm of the
activation entering the next affine layer from here instead of reading that activation
once more (:func:`gloro_fast.sound.forward_error.norm_upper_from_sumsq` turns sumsq into a
provable upper bound of the norm). The fused kernel also reads each pair once for both
min and max, where ``torch.minimum`` and ``torch.maximum`` read it twice.

Backward: out's gradient is routed back through the permutation (on a tie a gets the
min's gradient, as :class:`gloro_fast.nn.MinMax`), plus 2·x·grad_sumsq_n.

Layout: out (and the backward's grad_x) is channels_last when x is a 4-D channels_last
tensor (channels_last-contiguous and not contiguous), contiguous otherwise
(:func:`output_format`); ``contiguous_out=True`` makes out contiguous whatever x's layout
(for an output that is flattened next). The op carries torch's ``flexible_layout`` tag, so torch.compile's
Inductor, which lays convolution outputs out channels_last, hands them over as they are
instead of copying them to contiguous and back around every MinMax.

The op ``torch.ops.gloro_fast.minmax_norm`` and its backward op ``minmax_norm_backward``;
kernels: the reference below and the C++ CPU kernel (csrc/cpu/minmax_norm.cpp). Other
devices run the reference. ``minmax_norm_(x)`` (op ``gloro_fast::minmax_norm_``, no
autograd) is the same pass written over x, for an activation nothing else reads: it
returns the sums (the functional op's, bit for bit, from the C++ kernel) and x becomes
MinMax(x).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._validation import check_tensor
from ._backend import backend_for, get_backend
from ._library import define_inference_op, define_op

__all__ = ["fused_minmax_norm", "minmax_norm", "minmax_norm_", "minmax_norm_reference", "output_format"]

SCHEMA = "(Tensor x, bool contiguous_out=False) -> (Tensor, Tensor)"
INPLACE_SCHEMA = "(Tensor(a!) x) -> Tensor"
BACKWARD_SCHEMA = "(Tensor grad_out, Tensor grad_sumsq, Tensor x) -> Tensor"


def minmax_norm_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference in torch ops: ``torch.minimum``/``torch.maximum`` of the halves, and the
    float64 sum of squares of each sample."""
    a, b = x.chunk(2, dim=1)
    out = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
    sumsq = x.detach().to(torch.float64).square().flatten(1).sum(dim=1)
    return out, sumsq


def output_format(x: torch.Tensor, contiguous_out: bool = False) -> torch.memory_format:
    """The memory format of the op's outputs for input ``x`` (the C++ kernels' rule):
    channels_last for a 4-D channels_last-contiguous x that is not contiguous, else
    contiguous; contiguous whatever x's layout with ``contiguous_out``."""
    if (not contiguous_out and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def _check(x) -> None:
    check_tensor("x", x, min_ndim=2, floating=True)
    if x.shape[1] % 2:
        raise ValueError(f"x must have an even channel count (shape (N, C, ...), C even), got {tuple(x.shape)}")


def minmax_norm(x: torch.Tensor, contiguous_out: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(MinMax(x), Σ x_n² per sample)``: x (N, C, ...) floating point with C even →
    (out (N, C, ...) of x's dtype, sumsq (N,) float64). Differentiable in x.
    ``contiguous_out``: out contiguous even for a channels_last x (for an output that is
    flattened next: the kernel writes that order instead of leaving a copy to the flatten)."""
    _check(x)
    if backend_for("minmax_norm", x.device.type) == "reference":
        out, sumsq = minmax_norm_reference(x)
        return (out.contiguous() if contiguous_out else out), sumsq
    return _OP(x.contiguous(memory_format=output_format(x)), bool(contiguous_out))


def fused_minmax_norm(device_type: str) -> bool:
    """Whether :func:`minmax_norm` runs a fused kernel (not the reference) for tensors of
    ``device_type`` under the current backend setting (never raises: the ``triton`` setting,
    which has no kernel for this op, answers False)."""
    return get_backend() in ("auto", "cpp") and backend_for("minmax_norm", device_type) == "cpp"


# ---- the op: reference kernels, fake kernels, autograd ----


def _reference_kernel(x, contiguous_out=False):
    out, sumsq = minmax_norm_reference(x)
    return out.contiguous(memory_format=output_format(x, contiguous_out)), sumsq


def _reference_backward(grad_out, grad_sumsq, x):
    a, b = x.chunk(2, dim=1)
    g_low, g_high = grad_out.chunk(2, dim=1)
    a_low = a <= b
    grad = torch.cat([torch.where(a_low, g_low, g_high), torch.where(a_low, g_high, g_low)], dim=1)
    scale = (2.0 * grad_sumsq).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return (grad + scale * x).contiguous(memory_format=output_format(x))


def _fake(x, contiguous_out=False):
    return (torch.empty_like(x, memory_format=output_format(x, contiguous_out)),
            x.new_empty((x.shape[0],), dtype=torch.float64))


def _fake_backward(grad_out, grad_sumsq, x):
    return torch.empty_like(x, memory_format=output_format(x))


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    ctx.save_for_backward(x)


def _backward(ctx, grad_out, grad_sumsq):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if grad_sumsq is None:
        grad_sumsq = x.new_zeros((x.shape[0],), dtype=torch.float64)
    # grad_out in x's layout (a contiguous_out forward hands a contiguous one back)
    return _BACKWARD_OP(grad_out.contiguous(memory_format=output_format(x)), grad_sumsq.contiguous(), x), None


# Inductor hands the kernels its convolution outputs in the layout it chose (channels_last)
_LAYOUT_TAGS = tuple(t for t in (getattr(torch.Tag, "flexible_layout", None),) if t is not None)

_OP, _BACKWARD_OP = define_op(
    "minmax_norm", SCHEMA, BACKWARD_SCHEMA,
    fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    reference_forward=_reference_kernel, reference_backward=_reference_backward,
    tags=_LAYOUT_TAGS,
)


# ---- minmax_norm_: the same pass written over x ----


def _inplace_reference(x):
    """MinMax(x) written over x (the reference's values), returning the float64 sums of
    squares, summed from x before it is overwritten."""
    sumsq = x.detach().to(torch.float64).square().flatten(1).sum(dim=1)
    a, b = x.chunk(2, dim=1)
    low = torch.minimum(a, b)
    b.copy_(torch.maximum(a, b))
    a.copy_(low)
    return sumsq


_INPLACE_OP = define_inference_op(
    "minmax_norm_", INPLACE_SCHEMA, fake=lambda x: x.new_empty((x.shape[0],), dtype=torch.float64),
    reference=_inplace_reference, tags=_LAYOUT_TAGS)


def minmax_norm_(x: torch.Tensor) -> torch.Tensor:
    """:func:`minmax_norm` written over x: x (N, C, ...) with C even, contiguous or
    channels_last, becomes MinMax(x); returns Σ x_n² per sample (N,) float64, summed before
    the overwrite (the C++ kernel: the functional op's bits). For an activation that nothing
    else reads (the certifying pass's convolution outputs): no fresh output tensor, whose
    first touch costs about as much as the pass on a large activation. Without autograd: x
    must not require grad while grad mode is on."""
    _check(x)
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("minmax_norm_ overwrites x: x must not require grad while grad mode is enabled")
    if not x.is_contiguous(memory_format=output_format(x)):
        raise ValueError(f"x must be contiguous or channels_last, got strides {x.stride()} for shape {tuple(x.shape)}")
    sumsq = _INPLACE_OP(x)
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(x)  # x changed: what saved it must know
    return sumsq
