"""``activation_norm_upper``: the activation norms of the certifying pass (live and frozen
models) bound the exact norm from above, for any scale the float32 squares can hold, and
stay within the stated slack of it."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast.sound.forward_error import activation_norm_upper


def exact_norms(h: torch.Tensor):
    """‖h_b‖ from an exactly rounded sum of exact squares (math.fsum of float64 squares of
    float32 values), rounded up by one float64 ulp for the square root."""
    out = []
    for row in h.detach().to(torch.float64).flatten(1).tolist():
        out.append(math.sqrt(math.fsum(v * v for v in row)) * (1 + 2.0 ** -51))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 3, 16, 16), (6, 100), (6, 7, 5), (6, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bound_holds_and_is_tight(shape, dtype):
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-30, 1e-6, 1.0, 37.0, 1e9, 1e17])
    h = torch.randn(shape, generator=gen) * scales.view(-1, *[1] * (len(shape) - 1))
    h = h.to(dtype)
    bound = activation_norm_upper(h)
    exact = exact_norms(h)
    assert bound.dtype == torch.float64 and bound.shape == (shape[0],)
    assert (bound >= exact).all()
    # the slack: γ_{m+2} of the working precision (m terms per channel), γ_{G+2} of float64
    # over the G channels, a few upward roundings, and the underflow terms
    terms = math.prod(shape[2:]) if len(shape) > 2 else shape[1]
    groups = shape[1] if len(shape) > 2 else 1
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    slack = 2 * (terms + 4) * u + 2 * (groups + 4) * 2.0 ** -53 + 2.0 ** -45
    assert (bound <= exact * (1 + slack) + 1e-20).all()


def test_worst_case_rounding_of_a_long_row():
    """Many equal terms are the float32 sum's worst case: the bound still holds."""
    h = torch.full((2, 1, 512, 512), 1.0 + 2.0 ** -12)
    h[1] = 3.0 - 2.0 ** -22
    assert (activation_norm_upper(h) >= exact_norms(h)).all()


def test_zero_tiny_and_non_finite_rows():
    h = torch.zeros(5, 4, 3, 3)
    h[1] = 1e-40                       # subnormal float32: squares underflow to zero
    h[2, 0, 0, 0] = math.inf
    h[3, 1, 2, 2] = math.nan
    h[4] = 1e20                        # squares overflow float32: no finite bound
    bound = activation_norm_upper(h)
    assert bound[0] >= 0 and bound[0] < 1e-20
    assert bound[1] >= exact_norms(h[1:2])[0] and bound[1] < 1e-19
    assert torch.isinf(bound[2:]).all() and (bound[2:] > 0).all()


def test_empty_batch():
    assert activation_norm_upper(torch.zeros(0, 3, 4, 4)).shape == (0,)
    assert activation_norm_upper(torch.zeros(0, 8)).shape == (0,)


@pytest.mark.parametrize("shape", [(5, 1, 6, 6), (5, 3, 4, 4), (5, 17)], ids=str)
def test_values_are_the_two_level_formula_bit_for_bit(shape):
    """The shortcuts (one row: its float64 norm is its value; the inner rounding up without
    its NaN step) give exactly the formula's values, NaN and infinite entries included."""
    from gloro_fast.sound.forward_error import sample_norm_constants
    from gloro_fast.sound.rounding import up_tensor

    h = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    h[1].view(-1)[2] = math.nan
    h[2].view(-1)[0] = math.inf
    h[3] = 0.0
    flat = h.flatten(2) if h.dim() > 2 else h.unsqueeze(1)
    factor, offset = sample_norm_constants(tuple(h.shape[1:]), h.dtype)
    parts = torch.linalg.vector_norm(flat, dim=2, dtype=torch.float32)
    total = torch.linalg.vector_norm(parts, dim=1, dtype=torch.float64)
    want = up_tensor(up_tensor(total * factor) + offset)
    got = activation_norm_upper(h)
    assert torch.equal(got, want)
    assert got[1] == math.inf and got[2] == math.inf and got[3] > 0


@pytest.mark.parametrize("shape", [(6, 3, 5, 7), (6, 64, 3, 3), (6, 1, 4, 4)], ids=str)
def test_channels_last_activations_are_read_in_memory_order(shape):
    """A channels_last activation (the CPU certifying pass's layout) is read in place, its
    memory in min(C, H·W) rows of max(C, H·W) consecutive entries (the (G, m) of one of the
    two channel/pixel groupings); the constants hold for both groupings: the bound is the
    formula's for that view, and above the float64 norm."""
    from gloro_fast.sound.forward_error import activation_norm_constants, norm_rows, sample_norm_constants
    from gloro_fast.sound.rounding import up_tensor

    g = torch.Generator().manual_seed(4)
    h = (torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g)))
    h = h.contiguous(memory_format=torch.channels_last)
    rows = norm_rows(h)
    c, pixels = shape[1], shape[2] * shape[3]
    if c > 1:  # a view of h's memory, in its order
        assert rows.shape == (shape[0], min(c, pixels), max(c, pixels)) and rows.data_ptr() == h.data_ptr()
        assert torch.equal(rows.flatten(1), h.permute(0, 2, 3, 1).flatten(1))
    factor, offset = sample_norm_constants(shape[1:], h.dtype)
    for grouping in ((c, pixels), (pixels, c)):
        f, o = activation_norm_constants(grouping, h.dtype)
        assert factor >= f and offset >= o
    parts = torch.linalg.vector_norm(rows, dim=2, dtype=torch.float32)
    total = torch.linalg.vector_norm(parts, dim=1, dtype=torch.float64)
    want = up_tensor(up_tensor(total * factor) + offset)
    got = activation_norm_upper(h)
    assert torch.equal(got, want)
    exact = torch.linalg.vector_norm(h.double().flatten(1), dim=1)
    assert (got >= exact).all()
    assert torch.equal(activation_norm_upper(h.contiguous()) >= exact, torch.ones_like(exact, dtype=torch.bool))
