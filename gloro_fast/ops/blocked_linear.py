"""``blocked_linear(x, weight, bias, blocks)``: x Wᵀ + b with each dot product summed in blocks.

For x (*, n), W (out, n), b (out,) or None and k = ``blocks`` blocks of b' = ⌈n/k⌉ inputs
(x and W zero-padded to k·b' columns: the padding's products are exact zeros):

    y = Σ_k x_k W_kᵀ + b        (*, out), x's dtype

computed as one batched matrix product of the k partial products (k, N, out), then their
sum over k as a fixed tree of additions (:func:`tree_sum`: ⌈log₂ k⌉ levels), then the bias.
Every product goes through at most b' − 1 additions in its block (in whatever order the
BLAS chooses), ⌈log₂ k⌉ ≤ k − 1 between blocks and one for the bias: within the rounding
chain the certifying pass's allowance assumes (:meth:`gloro_fast.nn.Linear.forward_bound`),
b' + k instead of n + 1.

Why an op: under torch.compile, Inductor lays a flattened channels_last activation out as
it likes and may realise the blocks' view (k, N, b') with no unit-stride matrix dimension,
which the batched product then copies slice by slice (2C2F at B=1024: 3 ms of copies on
2 cores). As an op with the ``needs_exact_strides`` tag it receives x with the strides
eager PyTorch gives it (one contiguous copy where Inductor had another layout) and runs
the batched product on views of it. Eager calls cost one dispatch (a few µs).

Backward (the same map as x Wᵀ + b, however it is summed): grad_x = g W, grad_W = gᵀ x,
grad_b = Σ g over the leading dimensions.

The op ``torch.ops.gloro_fast.blocked_linear`` and its backward op ``blocked_linear_backward``
run the reference kernels below on CUDA, and on the CPU the C++ kernels of
csrc/cpu/blocked_linear.cpp: the same batched product, then the tree and the bias in one
pass, into the product's first block (the reference allocates a tensor per level of the
tree and for the bias, and reads the partial products about twice: 1.36x at 2C2F B = 1024,
benchmarks/bench_blocked_linear.py). Both give the same bits, so the frozen
model (:class:`gloro_fast.export.BlockedLinear`, the reference in torch ops) agrees with
the live certifying pass bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validation import check_tensor
from ._library import define_op

__all__ = ["blocked_linear", "blocked_linear_reference", "tree_sum"]

SCHEMA = "(Tensor x, Tensor weight, Tensor? bias, int blocks) -> Tensor"
BACKWARD_SCHEMA = "(Tensor grad, Tensor x, Tensor weight, bool has_bias) -> (Tensor, Tensor, Tensor)"


def blocked_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             blocks: int) -> torch.Tensor:
    """The computation in torch ops (differentiable; what :class:`gloro_fast.export.BlockedLinear`
    runs in a frozen model): x (*, n), weight (out, n) → (*, out)."""
    n = weight.shape[1]
    b = -(-n // blocks)
    lead = x.shape[:-1]
    h = x.reshape(-1, n)
    w = weight
    if blocks * b != n:  # zero padding: exact zero products
        h = torch.nn.functional.pad(h, (0, blocks * b - n))
        w = torch.nn.functional.pad(w, (0, blocks * b - n))
    parts = torch.bmm(h.view(-1, blocks, b).transpose(0, 1), w.view(w.shape[0], blocks, b).permute(1, 2, 0))
    y = tree_sum(parts)
    if bias is not None:
        y = y + bias
    return y.reshape(lead + (weight.shape[0],))


def tree_sum(parts: torch.Tensor) -> torch.Tensor:
    """Σ over the first dimension of ``parts`` (m, *) as a tree of additions fixed by m alone:
    halving, m → ⌈m/2⌉, ``parts[i] + parts[i + m//2]`` for i < m//2 with the odd last entry
    passed on. Elementwise additions of fixed operands give the same bits on every backend
    and shape (``torch.sum``'s order depends on the shape: at one sample it is not the
    order it takes for a batch), and the C++ kernel runs this tree in place."""
    while parts.shape[0] > 1:
        m = parts.shape[0]
        h = m // 2
        pairs = parts[:h] + parts[h:2 * h]
        parts = torch.cat((pairs, parts[2 * h:])) if m % 2 else pairs
    return parts[0]


def _check(x, weight, bias, blocks) -> None:
    check_tensor("x", x, min_ndim=1, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have weight's {weight.shape[1]} input features in its last dimension, got "
                         f"shape {tuple(x.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"{weight.dtype}, {weight.device}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0] or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) and x's dtype and device, got "
                             f"{tuple(bias.shape)} {bias.dtype} {bias.device}")
    most = max(1, weight.shape[1])
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= most:
        raise ValueError(f"blocks must be an int in [1, {most}] (the input features), got {blocks!r}")


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   blocks: int) -> torch.Tensor:
    """x Wᵀ + b, each dot product summed in ``blocks`` blocks: x (*, n), weight (out, n),
    bias (out,) or None → (*, out) in x's dtype. Differentiable in x, weight and bias."""
    _check(x, weight, bias, blocks)
    return _OP(x, weight, bias, blocks)


# ---- the op: reference kernels, fake kernels, autograd ----


def _reference_backward(grad, x, weight, has_bias):
    g = grad.reshape(-1, weight.shape[0])
    h = x.reshape(-1, weight.shape[1])
    grad_x = (g @ weight).reshape(x.shape)
    grad_w = g.t() @ h
    grad_b = g.sum(dim=0) if has_bias else g.new_empty((0,))
    return grad_x, grad_w, grad_b


def _fake(x, weight, bias, blocks):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _fake_backward(grad, x, weight, has_bias):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((weight.shape[0] if has_bias else 0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _BACKWARD_OP(grad.contiguous(), x, weight, ctx.has_bias)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_w if needs[1] else None,
            grad_b if ctx.has_bias and needs[2] else None, None)


_OP, _BACKWARD_OP = define_op(
    "blocked_linear", SCHEMA, BACKWARD_SCHEMA,
    fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    reference_forward=blocked_linear_reference, reference_backward=_reference_backward,
    # torch < 2.7 has no needs_exact_strides; the fixed stride order keeps x contiguous too
    tags=(getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order),),
)
