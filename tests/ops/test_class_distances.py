"""class_distances against an explicit per-pair loop (float64)."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast.ops import class_distances, class_distances_reference
from tests.helpers import reference_backend

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def loop_distances(w):
    """D_ji = ‖w_j − w_i‖ by a Python loop over pairs and coordinates."""
    rows = w.tolist()
    c = len(rows)
    out = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[j], rows[i]))) for i in range(c)] for j in range(c)]
    return torch.tensor(out, dtype=F64)


def loop_grad(w, g):
    """∂⟨g, D⟩/∂W by the per-pair formula, with 0 for coincident rows."""
    rows = w.tolist()
    c, d = len(rows), len(rows[0])
    grad = [[0.0] * d for _ in range(c)]
    for j in range(c):
        for i in range(c):
            diff = [a - b for a, b in zip(rows[j], rows[i])]
            dist = math.sqrt(sum(x * x for x in diff))
            if dist == 0:
                continue
            coeff = (g[j][i] + g[i][j]) / dist
            for k in range(d):
                grad[j][k] += coeff * diff[k]
    return torch.tensor(grad, dtype=F64)


# C = 30 > 25 makes torch.cdist take its matrix-multiplication (Gram) path when allowed
SHAPES = [(1, 1), (1, 6), (5, 1), (2, 3), (7, 4), (10, 32), (30, 5)]


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "gram"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_pair_loop(shape, exact, gen):
    w = torch.randn(*shape, generator=gen, dtype=F64) * 2
    d = class_distances(w, exact=exact)
    assert d.shape == (shape[0], shape[0]) and d.dtype == F64
    torch.testing.assert_close(d, loop_distances(w), rtol=1e-10, atol=1e-10)
    assert (d.diagonal() == 0).all()
    assert torch.equal(d, d.t()) or torch.allclose(d, d.t(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "gram"])
@pytest.mark.parametrize("shape", [(1, 3), (4, 1), (6, 5), (30, 4)])
def test_gradient_matches_pair_formula(shape, exact, gen):
    w = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(shape[0], shape[0], generator=gen, dtype=F64)
    class_distances(w, exact=exact).backward(g)
    torch.testing.assert_close(w.grad, loop_grad(w.detach(), g.tolist()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "gram"])
def test_gradient_of_sum_expanded_grad(exact, gen):
    # the gradient of .sum() arrives as an expanded, stride-0 tensor
    w = torch.randn(30, 3, generator=gen, dtype=F64, requires_grad=True)
    class_distances(w, exact=exact).sum().backward()
    ones = [[1.0] * 30 for _ in range(30)]
    torch.testing.assert_close(w.grad, loop_grad(w.detach(), ones), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "gram"])
@pytest.mark.parametrize("c", [4, 30])
def test_duplicate_rows(c, exact, gen):
    w = torch.randn(c, 3, generator=gen, dtype=F64)
    w[2] = w[0]
    w[c - 1] = w[0]
    w.requires_grad_(True)
    d = class_distances(w, exact=exact)
    for j, i in [(0, 2), (2, 0), (0, c - 1), (c - 1, 2)]:
        if exact:
            assert float(d.detach()[j, i]) == 0.0
        else:  # the Gram form may leave a rounding residue, never more than ~√ulp
            assert abs(float(d.detach()[j, i])) <= 1e-6
    g = torch.randn(c, c, generator=gen, dtype=F64)
    d.backward(g)
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad, loop_grad(w.detach(), g.tolist()), rtol=1e-8, atol=1e-8 if exact else 1e-6)


@pytest.mark.parametrize("c", [3, 30])
def test_exact_mode_has_no_cancellation(c, gen):
    # rows far from the origin, close to each other: ‖w_j‖² + ‖w_i‖² − 2 w_j·w_i cancels
    # catastrophically (error ~ ulp(‖w‖²) = 1e-4 here); direct differences do not
    w = 1e6 + torch.randn(c, 4, generator=gen, dtype=F64) * 1e-3
    w[1] = w[0]
    d = class_distances(w, exact=True)
    ref = loop_distances(w)
    torch.testing.assert_close(d, ref, rtol=1e-6, atol=1e-12)
    assert float(d[0, 1]) == 0.0 and float(d[1, 0]) == 0.0


def test_all_rows_equal_gives_zero(gen):
    w = torch.randn(1, 4, generator=gen, dtype=F64).repeat(5, 1).requires_grad_(True)
    d = class_distances(w, exact=True)
    assert torch.equal(d, torch.zeros(5, 5, dtype=F64))
    d.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_single_class_and_single_feature(gen):
    w = torch.randn(1, 7, generator=gen, dtype=F64, requires_grad=True)
    d = class_distances(w)
    assert d.shape == (1, 1) and float(d.detach()) == 0.0
    d.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    v = torch.tensor([[1.5], [-2.0], [4.0]], dtype=F64)
    expect = torch.tensor([[0.0, 3.5, 2.5], [3.5, 0.0, 6.0], [2.5, 6.0, 0.0]], dtype=F64)
    for exact in (True, False):
        torch.testing.assert_close(class_distances(v, exact=exact), expect, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "gram"])
@pytest.mark.parametrize("shape", [(2, 1), (5, 3), (27, 2)])
def test_gradcheck(shape, exact, gen):
    w = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: class_distances(x, exact=exact), (w,), eps=1e-6, atol=1e-7)


def test_reference_matches_entry(gen):
    w = torch.randn(6, 3, generator=gen, dtype=F64)
    # the public entry with the reference backend forced is exactly the reference
    with reference_backend():
        for exact in (True, False):
            torch.testing.assert_close(class_distances(w, exact), class_distances_reference(w, exact), rtol=0, atol=0)


def test_float32(gen):
    w = torch.randn(8, 16, generator=gen, dtype=F64)
    d32 = class_distances(w.float())
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), loop_distances(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "value, exc",
    [
        (torch.randn(5, dtype=F64), ValueError),
        (torch.randn(2, 3, 4, dtype=F64), ValueError),
        (torch.zeros(3, 4, dtype=torch.int64), TypeError),
        (torch.zeros(3, 4, dtype=torch.bool), TypeError),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]], dtype=F64), ValueError),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]], dtype=F64), ValueError),
        (torch.zeros(0, 3, dtype=F64), ValueError),
        (torch.zeros(3, 0, dtype=F64), ValueError),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError),
    ],
    ids=["1d", "3d", "int", "bool", "nan", "inf", "no-classes", "no-features", "list"],
)
def test_bad_inputs(value, exc, debug_checks):
    with pytest.raises(exc, match="weight"):
        class_distances(value)


def test_nonfinite_weight_without_debug_gives_nonfinite_distances():
    w = torch.tensor([[0.0, float("nan")], [1.0, 2.0], [3.0, 4.0]], dtype=F64)
    d = class_distances(w, exact=True)
    assert torch.isnan(d[0, 1]) and torch.isnan(d[1, 0]) and torch.isfinite(d[1, 2])
