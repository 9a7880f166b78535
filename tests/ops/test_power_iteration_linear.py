"""power_iteration_linear against exact spectral norms (float64)."""
from __future__ import annotations

import pytest
import torch

from gloro_fast.ops import power_iteration_linear, power_iteration_linear_reference
from tests.helpers import planted_matrix, reference_backend

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def unit(n, gen, dtype=F64):
    u = torch.randn(n, generator=gen, dtype=dtype)
    return u / torch.linalg.vector_norm(u)


def planted(m, n, gen, top=3.0, rest=1.5):
    return planted_matrix(m, n, gen, top, rest)


def converge(weight, u, chunk=1, tol=1e-12, max_calls=20000):
    """Call the op until the relative change of σ̂ is below tol."""
    u, sigma = power_iteration_linear(weight, u, 0)
    for _ in range(max_calls):
        u, new = power_iteration_linear(weight, u, chunk)
        if abs(float(new) - float(sigma)) <= tol * abs(float(new)):
            return u, new
        sigma = new
    raise AssertionError("power iteration did not converge")


SHAPES = [(1, 1), (1, 7), (7, 1), (5, 3), (3, 5), (17, 9), (8, 40), (64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_converges_to_spectral_norm_planted(shape, gen):
    w = planted(*shape, gen)
    _, sigma = converge(w, unit(shape[1], gen))
    exact = torch.linalg.matrix_norm(w, ord=2)
    assert abs(float(exact) - 3.0) < 1e-12
    assert abs(float(sigma) - float(exact)) <= 1e-5 * float(exact)


@pytest.mark.parametrize("shape", SHAPES + [(2, 30), (30, 2), (12, 11)])
def test_converges_to_spectral_norm_gaussian(shape, gen):
    w = torch.randn(*shape, generator=gen, dtype=F64) * 0.7
    _, sigma = converge(w, unit(shape[1], gen), chunk=10, tol=1e-13)
    exact = torch.linalg.matrix_norm(w, ord=2)
    assert abs(float(sigma) - float(exact)) <= 1e-5 * float(exact)


def test_one_step_matches_formula(gen):
    w = torch.randn(6, 4, generator=gen, dtype=F64)
    u = unit(4, gen)
    new_u, sigma = power_iteration_linear(w, u, 1)
    expect = w.t() @ (w @ u)
    expect = expect / expect.norm()
    torch.testing.assert_close(new_u, expect, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(sigma, torch.linalg.vector_norm(w @ expect), rtol=1e-13, atol=0)
    # two steps = the formula applied twice
    u2, _ = power_iteration_linear(w, u, 2)
    e2 = w.t() @ (w @ expect)
    torch.testing.assert_close(u2, e2 / e2.norm(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (4, 9), (9, 4), (20, 20)])
def test_lower_bound_and_monotone(shape, gen):
    for _ in range(5):
        w = torch.randn(*shape, generator=gen, dtype=F64)
        exact = float(torch.linalg.matrix_norm(w, ord=2))
        u = unit(shape[1], gen)
        _, prev = power_iteration_linear(w, u, 0)
        assert float(prev) <= exact * (1 + 1e-12)
        for _ in range(8):
            u, sigma = power_iteration_linear(w, u, 1)
            assert float(sigma) <= exact * (1 + 1e-12)
            # Rayleigh quotients of power iterates on WᵀW never decrease
            assert float(sigma) >= float(prev) * (1 - 1e-12)
            prev = sigma


def test_iterate_stays_unit(gen):
    w = torch.randn(7, 5, generator=gen, dtype=F64) * 100
    u, _ = power_iteration_linear(w, unit(5, gen), 3)
    assert abs(float(u.norm()) - 1.0) < 1e-13


def test_list_form_equals_per_layer(gen):
    shapes = [(3, 5), (8, 2), (1, 4), (6, 6)]
    ws = [torch.randn(*s, generator=gen, dtype=F64) for s in shapes]
    us = [unit(s[1], gen) for s in shapes]
    new_us, sigmas = power_iteration_linear(ws, us, 3)
    assert isinstance(new_us, list) and isinstance(sigmas, list)
    assert len(new_us) == len(sigmas) == len(shapes)
    for w, u, nu, s in zip(ws, us, new_us, sigmas):
        one_u, one_s = power_iteration_linear(w, u, 3)
        torch.testing.assert_close(nu, one_u, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(s, one_s, rtol=1e-14, atol=0)
        assert s.dim() == 0 and nu.shape == u.shape
    # tuples work too; an empty list is an empty result
    t_us, t_s = power_iteration_linear(tuple(ws), tuple(us), 3)
    torch.testing.assert_close(t_s[2], sigmas[2], rtol=0, atol=0)
    assert power_iteration_linear([], [], 2) == ([], [])


def test_reference_matches_entry(gen):
    ws = [torch.randn(4, 3, generator=gen, dtype=F64)]
    us = [unit(3, gen)]
    a = power_iteration_linear_reference(ws, us, 4)
    with reference_backend():  # the public entry with the reference backend forced
        b = power_iteration_linear(ws, us, 4)
    torch.testing.assert_close(a[0][0], b[0][0], rtol=0, atol=0)
    torch.testing.assert_close(a[1][0], b[1][0], rtol=0, atol=0)


def test_zero_iterations_returns_norm_of_wu(gen):
    w = torch.randn(5, 8, generator=gen, dtype=F64)
    u = unit(8, gen)
    new_u, sigma = power_iteration_linear(w, u, 0)
    torch.testing.assert_close(new_u, u, rtol=0, atol=0)
    assert abs(float(sigma) - float(torch.linalg.vector_norm(w @ u))) < 1e-14
    # a non-unit u is taken as given (no normalisation with n_iter=0)
    _, s2 = power_iteration_linear(w, 2 * u, 0)
    assert abs(float(s2) - 2 * float(sigma)) < 1e-13


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("value", [3e30, float("inf"), float("nan")])
def test_overflowing_or_non_finite_matrix_keeps_iterate(gen, value, backend):
    """Squares that overflow float32 (the norm is +inf, the quotient 0), an infinite or a
    NaN entry: the iterate is kept, as for a zero operator (never zeros or NaN for good)."""
    from gloro_fast.ops import use_backend

    w = torch.full((4, 6), 1.0)
    w[1, 2] = value
    u = unit(6, gen).float()
    with use_backend(backend):
        new_u, _ = power_iteration_linear(w, u, 3)
    torch.testing.assert_close(new_u, u, rtol=0, atol=0)


def test_zero_matrix_keeps_iterate(gen):
    w = torch.zeros(4, 6, dtype=F64)
    u = unit(6, gen)
    new_u, sigma = power_iteration_linear(w, u, 5)
    assert torch.isfinite(new_u).all()
    torch.testing.assert_close(new_u, u, rtol=0, atol=0)
    assert float(sigma) == 0.0
    # the weights move away from 0: iteration resumes from the kept iterate
    w2 = planted(4, 6, gen)
    _, s = converge(w2, new_u)
    assert abs(float(s) - 3.0) <= 3e-5


def test_gradient_formula(gen):
    w = torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=True)
    u0 = unit(4, gen)
    u, sigma = power_iteration_linear(w, u0, 3)
    assert not u.requires_grad and sigma.requires_grad
    sigma.backward()
    wd = w.detach()
    expect = torch.outer(wd @ u, u) / torch.linalg.vector_norm(wd @ u)
    torch.testing.assert_close(w.grad, expect, rtol=1e-12, atol=1e-14)


def test_gradient_only_reaches_weights_in_list_form(gen):
    ws = [torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(2)]
    us = [unit(4, gen) for _ in range(2)]
    new_us, sigmas = power_iteration_linear(ws, us, 2)
    (2.0 * sigmas[0] + 3.0 * sigmas[1]).backward()
    for w, u, c in zip(ws, new_us, (2.0, 3.0)):
        wd = w.detach()
        expect = c * torch.outer(wd @ u, u) / torch.linalg.vector_norm(wd @ u)
        torch.testing.assert_close(w.grad, expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 3), (3, 1), (4, 6)])
def test_gradcheck(shape, gen):
    w = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    u, _ = power_iteration_linear(w.detach(), unit(shape[1], gen), 2)

    def fn(weight):
        return power_iteration_linear(weight, u, 0)[1]

    assert torch.autograd.gradcheck(fn, (w,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, (w,), eps=1e-6, atol=1e-7)


def _bad_cases():
    w = torch.randn(3, 4, dtype=F64)
    u = torch.randn(4, dtype=F64)
    return [
        ("weights-1d", lambda: power_iteration_linear(u, u, 1), ValueError, "weights[0]"),
        ("weights-3d", lambda: power_iteration_linear(w[None], u, 1), ValueError, "weights[0]"),
        ("iterate-shape", lambda: power_iteration_linear(w, torch.randn(3, dtype=F64), 1), ValueError, "iterates[0]"),
        ("iterate-2d", lambda: power_iteration_linear(w, u[None], 1), ValueError, "iterates[0]"),
        ("weights-int", lambda: power_iteration_linear(w.long(), u, 1), TypeError, "weights[0]"),
        ("iterate-int", lambda: power_iteration_linear(w, u.long(), 1), TypeError, "iterates[0]"),
        ("weights-not-tensor", lambda: power_iteration_linear([w.tolist()], [u], 1), TypeError, "weights[0]"),
        ("lengths", lambda: power_iteration_linear([w, w], [u], 1), ValueError, "iterates"),
        ("n-iter-negative", lambda: power_iteration_linear(w, u, -1), ValueError, "n_iter"),
        ("n-iter-float", lambda: power_iteration_linear(w, u, 1.0), TypeError, "n_iter"),
        ("n-iter-bool", lambda: power_iteration_linear(w, u, True), TypeError, "n_iter"),
        ("dtype", lambda: power_iteration_linear(w, u.float(), 1), ValueError, "iterates[0]"),
        ("device", lambda: power_iteration_linear(w, u.to("meta"), 1), ValueError, "iterates[0]"),
        ("second-layer", lambda: power_iteration_linear([w, w], [u, u[:3]], 1), ValueError, "iterates[1]"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, call, exc, name = case
    with pytest.raises(exc) as info:
        call()
    assert name in str(info.value)


def test_float32_close_to_float64(gen):
    w = planted(6, 5, gen)
    u = unit(5, gen)
    _, s64 = power_iteration_linear(w, u, 30)
    u32, s32 = power_iteration_linear(w.float(), u.float(), 30)
    assert s32.dtype == torch.float32 and u32.dtype == torch.float32
    assert abs(float(s32) - float(s64)) < 1e-5
