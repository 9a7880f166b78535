"""norm_basis: the allowance's basis from the recorded norm rows in one op — the reference
against norm_uppers and the stack it replaces bit for bit, the C++ CPU kernel against the
reference to a few ulps (its square root is correctly rounded, torch's faithful), both on
NaN, infinite, zero, subnormal and huge sums of squares and rows that are already norms;
an independent float64 bound, the argument checks, opcheck, and the certifying pass built
on it."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast.models import cnn_2C2F
from gloro_fast.ops import norm_basis, norm_basis_reference, use_backend
from gloro_fast.sound.forward_error import (
    SumOfSquares,
    activation_norm_constants,
    measured_norm,
    norm_terms,
    norm_uppers,
)
from gloro_fast.sound.rounding import up_tensor, up_tensor_inner
from tests.ops.cpp_helpers import has_cpu_kernels

needs_cpp = pytest.mark.skipif(not has_cpu_kernels("norm_basis"), reason="gloro_fast._C without norm_basis")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def rows_for(b, seed):
    """A sum of squares with every awkward value, a norm row, two more sums and a measured
    norm (as activation_norm_upper leaves it before its roundings up)."""
    g = torch.Generator().manual_seed(seed)
    sums = (torch.rand(3, b, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-300, 300, (3, b), generator=g))
    if b >= 6:
        sums[0, :6] = torch.tensor([math.nan, math.inf, 0.0, 5e-324, 1.7e308, 2.0], dtype=torch.float64)
    norm = torch.rand(b, generator=g, dtype=torch.float64) * 50
    terms = [784, 3136, 100]
    measured = measured_norm(torch.randn(b, 3, 4, 5, generator=g) * 7)
    if b >= 3:
        measured.total[:3] = torch.tensor([math.nan, math.inf, 0.0], dtype=torch.float64)
    bounds = [SumOfSquares(sums[0], terms[0]), norm, SumOfSquares(sums[1], terms[1]), SumOfSquares(sums[2], terms[2]),
              measured]
    return bounds


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [0, 1, 7, 1024])
def test_the_bits_of_norm_uppers_then_the_stack(backend, b):
    bounds = rows_for(b, seed=b)
    want = torch.stack(norm_uppers(bounds) + [torch.ones(b, dtype=torch.float64)], dim=1)
    with use_backend(backend):
        got = norm_basis(*norm_terms(bounds))
    assert got.shape == (b, 6) and got.dtype == torch.float64
    assert torch.equal(norm_basis_reference(*norm_terms(bounds)), want)
    # a measured norm is finished exactly as activation_norm_upper finishes it
    m = bounds[4]
    assert torch.equal(want[:, 4], up_tensor(up_tensor_inner(m.total * m.factor) + m.offset))
    if backend == "reference":
        assert torch.equal(got, want)
    else:  # a correctly rounded root against a faithful one: a few ulps at most
        torch.testing.assert_close(got, want, rtol=2.0 ** -49, atol=0.0)
        assert torch.equal(got[:, [1, 4]], want[:, [1, 4]]) and torch.equal(got.isinf(), want.isinf())
    if b >= 6:  # NaN and +inf sums fail closed (+inf), a zero sum gives the offset alone
        assert got[0, 0] == math.inf and got[1, 0] == math.inf and 0 < got[2, 0] < 1e-100
        assert got[0, 4] == math.inf and got[1, 4] == math.inf and 0 < got[2, 4] < 1e-20  # float32 underflow terms
        assert torch.equal(got[:, 1], bounds[1]) and (got[:, 5] == 1).all()


def test_each_taken_row_bounds_the_norm_it_stands_for():
    """An independent check: for entries whose float64 squares sum to S̃ (computed in
    float64 in another order), the basis entry is ≥ the exact norm (math.fsum of the exact
    squares of float32 values)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 300, generator=g) * 1e3).float()
    sumsq = (x.double() ** 2).flip(1).sum(dim=1)
    f, o = activation_norm_constants((1, 300), torch.float64)
    for backend in ("reference", "cpp") if has_cpu_kernels("norm_basis") else ("reference",):
        with use_backend(backend):
            got = norm_basis([sumsq], [f], [o], [1])[:, 0]
        for i in range(64):
            exact = math.sqrt(math.fsum(float(v) ** 2 for v in x[i].double()))
            assert float(got[i]) >= exact


def test_argument_checks():
    r = torch.rand(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one"):
        norm_basis([], [], [], [])
    with pytest.raises(ValueError, match="one entry per row"):
        norm_basis([r, r], [1.0], [0.0, 0.0], [1, 1])
    with pytest.raises(ValueError, match="kinds must be 0"):
        norm_basis([r, r], [1.0, 1.0], [0.0, 0.0], [1, 3])
    with pytest.raises(ValueError, match=r"rows\[1\] must be a float64"):
        norm_basis([r, r.float()], [1.0, 1.0], [0.0, 0.0], [1, 1])
    with pytest.raises(ValueError, match="one shape and device"):
        norm_basis([r, torch.rand(5, dtype=torch.float64)], [1.0, 1.0], [0.0, 0.0], [1, 1])


@needs_cpp
def test_opcheck():
    rows, factors, offsets, kinds = norm_terms(rows_for(9, seed=3))
    torch.library.opcheck(torch.ops.gloro_fast.norm_basis.default, (rows, factors, offsets, kinds))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_certifying_pass_takes_its_basis_from_the_op(backend):
    """SoundBounds.per_sample_basis on a real network's recorded norms is the old
    norm_uppers-then-basis computation, bit for bit."""
    torch.manual_seed(0)
    model = cnn_2C2F(input_shape=(1, 12, 12), num_classes=4).eval()
    x = torch.rand(33, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with use_backend(backend), torch.no_grad():
        _, sb, forms, basis, _ = model._sound_basis(x)
    assert forms is sb.forms.per_sample and basis.shape == (33, forms.size)
    assert (basis[:, -1] == 1).all() and (basis[:, :-1] > 0).all()
