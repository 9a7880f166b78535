"""blocked_linear: x Wᵀ + b summed in blocks, as an op — values against a per-block float64
loop, gradients (float64 gradcheck), the fake kernels (opcheck), argument checks, and the
layout it exists for: under torch.compile it receives x contiguous, as in eager. (The
rounding bound of the blocked sum is tested in tests/sound/test_blocked_linear.py.)"""
from __future__ import annotations

import pytest
import torch

from gloro_fast import GloroNet
from gloro_fast import nn as gnn
from gloro_fast.ops import blocked_linear, blocked_linear_reference, use_backend
from gloro_fast.ops._backend import backend_for
from gloro_fast.ops.blocked_linear import tree_sum
from tests.ops.cpp_helpers import compiled_certify, recording_forward, requires_cpu_kernels


def per_block_loop(x, w, bias, blocks):
    """Σ_k x_k W_kᵀ + b in float64, one block at a time (independent of the op)."""
    n = w.shape[1]
    b = -(-n // blocks)
    y = torch.zeros(x.shape[:-1] + (w.shape[0],), dtype=torch.float64)
    for k in range(blocks):
        cols = slice(k * b, min(n, (k + 1) * b))
        y += x[..., cols].double() @ w[:, cols].double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("n, blocks, lead", [(1568, 16, (5,)), (100, 7, (2, 3)), (9, 9, (4,)), (5, 1, (3,))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_against_a_per_block_loop(n, blocks, lead, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(lead + (n,), generator=g)
    w = torch.randn(11, n, generator=g)
    bias = torch.randn(11, generator=g) if with_bias else None
    got = blocked_linear(x, w, bias, blocks)
    assert got.shape == lead + (11,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), per_block_loop(x, w, bias, blocks), rtol=1e-5, atol=1e-4)
    assert torch.equal(got, blocked_linear_reference(x, w, bias, blocks))  # the C++ kernel gives its bits


def test_tree_sum_is_the_halving_tree():
    """tree_sum's order, written out: 5 entries → (p0 + p2, p1 + p3, p4) → ((p0 + p2) + p4,
    p1 + p3) → ((p0 + p2) + p4) + (p1 + p3); entries chosen so other orders round otherwise."""
    p = torch.tensor([[1.0], [2.0 ** -24], [-1.0], [2.0 ** -24], [2.0 ** -25]])
    want = ((p[0] + p[2]) + p[4]) + (p[1] + p[3])
    assert torch.equal(tree_sum(p), want)
    assert not torch.equal(p[0] + p[1] + p[2] + p[3] + p[4], want)  # the sequential order differs
    q = torch.randn(16, 7, 3, generator=torch.Generator().manual_seed(4))
    pairs = [q[i] + q[i + 8] for i in range(8)]
    pairs = [pairs[i] + pairs[i + 4] for i in range(4)]
    pairs = [pairs[i] + pairs[i + 2] for i in range(2)]
    assert torch.equal(tree_sum(q), pairs[0] + pairs[1])


@requires_cpu_kernels("blocked_linear")
@pytest.mark.parametrize("n, blocks, lead", [(1568, 16, (1024,)), (1568, 16, (1,)), (1570, 16, (257,)),
                                             (100, 7, (2, 3)), (9, 9, (4,)), (5, 1, (3,)), (4096, 16, (3,)),
                                             (3000, 3, (40,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpp_kernel_gives_the_reference_bits(n, blocks, lead, dtype, with_bias):
    """The C++ kernel (the tree and bias in one pass, in place) and the torch-op reference
    the frozen model runs agree bit for bit, one sample or a thousand, any block count."""
    g = torch.Generator().manual_seed(n + blocks)
    x = torch.randn(lead + (n,), generator=g).to(dtype)
    w = torch.randn(12, n, generator=g).to(dtype)
    bias = torch.randn(12, generator=g).to(dtype) * 10 if with_bias else None
    with use_backend("cpp"):
        got = blocked_linear(x, w, bias, blocks)
    assert got.shape == lead + (12,) and got.dtype == dtype
    assert torch.equal(got, blocked_linear_reference(x, w, bias, blocks))


@requires_cpu_kernels("blocked_linear")
def test_cpp_backward_against_the_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 40, generator=g, requires_grad=True)
    w = torch.randn(6, 40, generator=g, requires_grad=True)
    bias = torch.randn(6, generator=g, requires_grad=True)
    grad = torch.randn(4, 3, 6, generator=g)
    with use_backend("cpp"):
        got = torch.autograd.grad(blocked_linear(x, w, bias, 5), (x, w, bias), grad)
    want = torch.autograd.grad(blocked_linear_reference(x, w, bias, 5), (x, w, bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_against_float64_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 10, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: blocked_linear(a, b, c, 3), (x, w, bias))
    assert torch.autograd.gradcheck(lambda a, b: blocked_linear(a, b, None, 4), (x, w))


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x, w, bias = torch.randn(6, 20, generator=g), torch.randn(5, 20, generator=g), torch.randn(5, generator=g)
    torch.library.opcheck(torch.ops.gloro_fast.blocked_linear.default, (x, w, bias, 4))
    torch.library.opcheck(torch.ops.gloro_fast.blocked_linear.default, (x, w, None, 3))
    grad = torch.randn(6, 5, generator=g)
    torch.library.opcheck(torch.ops.gloro_fast.blocked_linear_backward.default, (grad, x, w, True))
    with use_backend("cpp"):
        torch.library.opcheck(torch.ops.gloro_fast.blocked_linear.default, (x, w, bias, 4))
        torch.library.opcheck(torch.ops.gloro_fast.blocked_linear_backward.default, (grad, x, w, False))


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 5), torch.zeros(3, 4), None, 2), "input features"),
    ((torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64), None, 2), "dtype"),
    ((torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2), 2), "bias"),
    ((torch.zeros(2, 4), torch.zeros(3, 4), None, 0), "blocks"),
    ((torch.zeros(2, 4), torch.zeros(3, 4), None, 5), "blocks"),
    ((torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 4), None, 2), "floating"),
])
def test_bad_input_is_a_clear_error(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        blocked_linear(*args)


def test_compiled_certify_gives_the_op_contiguous_input():
    """Inductor lays the flattened activation of a channels_last convolution out as it
    likes; the op's needs_exact_strides tag makes it arrive contiguous (the batched product
    then runs on views of it, without copying each block), and the compiled certificate is
    the eager one."""
    seen = []
    torch.manual_seed(0)
    model = GloroNet(torch.nn.Sequential(
        gnn.Conv2d(1, 8, 3, padding=1), gnn.MinMax(), gnn.Conv2d(8, 8, 3, padding=1), gnn.MinMax(),
        gnn.Flatten(), gnn.Linear(8 * 7 * 7, 20), gnn.MinMax()), gnn.Linear(20, 4),
        epsilon=0.01, input_shape=(1, 7, 7)).eval()
    x = torch.rand(16, 1, 7, 7, generator=torch.Generator().manual_seed(3))
    eager = model.certify(x)
    backend = backend_for("blocked_linear", "cpu")  # the C++ kernel where it is built
    with recording_forward("blocked_linear", backend, lambda h, *rest: seen.append(h.is_contiguous())):
        compiled = compiled_certify(model, x)
    assert torch.equal(compiled, eager)
    assert seen and all(seen)
