"""The certifying pass's dense layers: each dot product summed in k blocks of b
(gloro_fast.ops.blocked_linear), whose rounding error is bounded by a chain of
b + k − 1 roundings instead of in_features — what Linear.forward_bound's per-sample step
assumes. Checked entrywise against float64 on inputs built for cancellation."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast import nn as gnn
from gloro_fast.nn.linear import CERTIFYING_BLOCKS, certifying_blocks
from gloro_fast.ops import blocked_linear
from gloro_fast.sound.forward_error import Arithmetic, ForwardBound
from gloro_fast.sound.rounding import gamma

U32 = 2.0 ** -24


@pytest.mark.parametrize("n", [1, 8, 20, 37, 100, 1568, 1570, 4096])
def test_blocks(n):
    k, b = certifying_blocks(n)
    if k == 1:
        assert b == n and n <= 2 * CERTIFYING_BLOCKS
    else:
        assert k == CERTIFYING_BLOCKS and k * b >= n > k * (b - 1) and b + k - 1 < n


@pytest.mark.parametrize("n", [37, 100, 1568, 1570])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_blocked_linear_is_the_linear_map(n, lead):
    gen = torch.Generator().manual_seed(n)
    w, bias = torch.randn(24, n, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(lead + (n,), generator=gen)
    k, _ = certifying_blocks(n)
    got = blocked_linear(x, w, bias, k)
    assert got.shape == lead + (24,)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(blocked_linear(x, w, None, k), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [100, 1568, 1570, 4096])
def test_blocked_rounding_within_the_short_chain(n):
    """|fl(Wx + b) − (Wx + b)| ≤ γ_{b+k}(|W||x| + |b|) entrywise, on inputs whose products
    are large and cancel (the exact result is far smaller than its terms)."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, n, generator=gen)
    x = torch.randn(32, n, generator=gen) * 1e3
    x[:, 1::2] = -x[:, 0::2][:, : x[:, 1::2].shape[1]] * (1 + 2.0 ** -12)  # near-cancelling pairs
    w[:, 1::2] = w[:, 0::2][:, : w[:, 1::2].shape[1]]
    bias = torch.randn(64, generator=gen) * 1e3
    k, b = certifying_blocks(n)
    got = blocked_linear(x, w, bias, k).double()
    exact = x.double() @ w.double().t() + bias.double()
    scale = x.double().abs() @ w.double().abs().t() + bias.double().abs()
    err = (got - exact).abs()
    bound = gamma(b + k, U32) * scale
    assert (err <= bound).all()
    # much shorter than the plain chain, and the inputs do round
    assert gamma(b + k, U32) * 4 < gamma(n + 1, U32)
    assert (err > 0).any()


def test_forward_bound_step_uses_the_blocked_chain():
    layer = gnn.Linear(1568, 100)
    arith = Arithmetic.of(torch.float32)
    start = ForwardBound((1568,))
    fb = layer.forward_bound(start, arith, lambda m: float(m.lipschitz_upper_bound()))
    k, b = certifying_blocks(1568)
    step = fb.steps[-1]
    assert step.gamma == gamma(b + k - 1 + 2, arith.u)
    # the a-priori error still covers the plain forward (a chain of in_features + 2)
    plain = gamma(1568 + 2, arith.u)
    assert fb.error.a >= plain * step.abs_norm * 0.999
    assert math.isfinite(fb.error.a)


def test_certifying_forward_is_the_blocked_form():
    layer = gnn.Linear(1568, 10)
    x = torch.randn(4, 1568)
    k, _ = certifying_blocks(1568)
    assert torch.equal(layer.certifying_forward(x), blocked_linear(x, layer.weight, layer.bias, k))
    small = gnn.Linear(8, 3)
    assert torch.equal(small.certifying_forward(x[:, :8]), small(x[:, :8]))
