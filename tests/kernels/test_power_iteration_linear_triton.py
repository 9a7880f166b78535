"""Triton power_iteration_linear (many layers in one launch) against the reference: through
the public op with the triton backend selected, and the kernels alone (as the backend table
holds them)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_usable", "triton_backend")

import gloro_fast.kernels.power_iteration_linear  # noqa: E402,F401  (registers the Triton kernels)
from gloro_fast.ops import (  # noqa: E402
    power_iteration_linear,
    power_iteration_linear_reference,
    registry,
)

F64 = torch.float64
TRITON = registry.kernels("power_iteration_linear", "triton")


# (1,1), d = 1 columns, tails past BLOCK_M = 32 rows and BLOCK_N = 64 columns
SHAPES = [(7, 5), (1, 1), (70, 3), (3, 130), (2, 1)]


def _layers(shapes, dtype, device, gen):
    weights, iterates = [], []
    for m, n in shapes:
        weights.append(torch.randn(m, n, generator=gen, dtype=F64).to(dtype=dtype, device=device))
        u = torch.randn(n, generator=gen, dtype=F64)
        iterates.append((u / u.norm()).to(dtype=dtype, device=device))
    return weights, iterates


def _compare(weights, iterates, n_iter, gen, tol):
    ws = [w.detach().clone().requires_grad_() for w in weights]
    refs = [w.detach().double().cpu().requires_grad_() for w in weights]
    us, sigmas = power_iteration_linear(ws, iterates, n_iter)
    rus, rsigmas = power_iteration_linear_reference(refs, [u.double().cpu() for u in iterates], n_iter)
    g = torch.randn(len(ws), generator=gen, dtype=F64)
    sum(s * c for s, c in zip(sigmas, g.tolist())).backward()
    sum(s * c for s, c in zip(rsigmas, g.tolist())).backward()
    for w, u, s, ru, rs, r in zip(ws, us, sigmas, rus, rsigmas, refs):
        assert u.shape == ru.shape and u.dtype == w.dtype and not u.requires_grad
        assert s.shape == () and s.dtype == w.dtype
        torch.testing.assert_close(u.double().cpu(), ru, rtol=tol, atol=tol)
        torch.testing.assert_close(s.double().cpu(), rs, rtol=tol, atol=tol)
        torch.testing.assert_close(w.grad.double().cpu(), r.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_iter", [0, 1, 4])
def test_float64_many_layers(n_iter, device, gen):
    weights, iterates = _layers(SHAPES, F64, device, gen)
    _compare(weights, iterates, n_iter, gen, 1e-10)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 4e-2)]
)
def test_low_precision(dtype, tol, device, gen):
    weights, iterates = _layers([(9, 6), (4, 17)], dtype, device, gen)
    _compare(weights, iterates, 2, gen, tol)


def test_single_layer_form_and_convergence(device, gen):
    w = torch.randn(12, 9, generator=gen, dtype=F64).to(device)
    u0 = torch.ones(9, dtype=F64, device=device) / 3.0
    u, sigma = power_iteration_linear(w, u0, 25)
    assert isinstance(u, torch.Tensor) and u.shape == (9,)
    true = torch.linalg.matrix_norm(w.cpu(), ord=2)
    assert float(sigma) <= float(true) * (1 + 1e-12)
    assert float(sigma) >= 0.99 * float(true)
    assert abs(float(u.norm()) - 1.0) < 1e-12


def test_zero_operator_keeps_iterate_and_zero_gradient(device):
    w = torch.zeros(4, 3, dtype=F64, device=device, requires_grad=True)
    u0 = torch.tensor([0.6, 0.8, 0.0], dtype=F64, device=device)
    u, sigma = power_iteration_linear(w, u0, 3)
    assert torch.equal(u, u0) and float(sigma.detach()) == 0.0
    sigma.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("value", [3e30, float("inf"), float("nan")])
def test_overflowing_or_non_finite_operator_keeps_iterate(device, value):
    w = torch.ones(4, 3, device=device)
    w[1, 2] = value
    u0 = torch.tensor([0.6, 0.8, 0.0], device=device)
    u, _ = power_iteration_linear(w, u0, 3)
    assert torch.equal(u, u0)


def test_mixed_dtypes_are_grouped(device, gen):
    (w1, w2), (u1, u2) = _layers([(5, 4), (3, 6)], F64, device, gen)
    us, sigmas = power_iteration_linear([w1, w2.float()], [u1, u2.float()], 2)
    assert us[0].dtype == F64 and us[1].dtype == torch.float32 and sigmas[1].dtype == torch.float32
    ref_u, ref_s = power_iteration_linear_reference([w1.cpu()], [u1.cpu()], 2)
    torch.testing.assert_close(us[0].cpu(), ref_u[0])
    torch.testing.assert_close(sigmas[0].cpu(), ref_s[0])


def test_kernels_alone_with_an_expanded_gradient(device, gen):
    """The kernels with the op's signatures; the gradients are views of one stride-0 tensor."""
    weights, iterates = _layers([(5, 4), (2, 7)], F64, device, gen)
    us, sigmas, images = TRITON.forward(weights, iterates, 1)
    for w, u, y in zip(weights, us, images):  # the image W u, in the accumulation dtype
        torch.testing.assert_close(y.cpu(), (w @ u).cpu(), rtol=1e-12, atol=1e-12)
    grads = torch.ones((), dtype=F64, device=device).expand(2).unbind(0)
    got = TRITON.backward(list(grads), weights, us, sigmas, images)
    refs = [w.detach().cpu().requires_grad_() for w in weights]
    rus, rs = power_iteration_linear_reference(refs, [t.cpu() for t in iterates], 1)
    sum(rs).backward()
    for g, u, s, ref, ru, r in zip(got, us, sigmas, refs, rus, rs):
        torch.testing.assert_close(u.cpu(), ru, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.cpu(), r.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g.cpu(), ref.grad, rtol=1e-10, atol=1e-10)


def test_non_contiguous_weight(device, gen):
    w = torch.randn(6, 8, generator=gen, dtype=F64).to(device).t()  # (8, 6), transposed strides
    u0 = torch.ones(6, dtype=F64, device=device) / 6**0.5
    u, sigma = power_iteration_linear(w, u0, 2)
    ru, rs = power_iteration_linear_reference([w.cpu()], [u0.cpu()], 2)
    torch.testing.assert_close(u.cpu(), ru[0])
    torch.testing.assert_close(sigma.cpu(), rs[0])


def test_custom_op_registration(device, gen):
    weights, iterates = _layers([(3, 2), (4, 5)], torch.float32, device, gen)
    torch.library.opcheck(
        torch.ops.gloro_fast.power_iteration_linear.default,
        ([w.requires_grad_() for w in weights], iterates, 1),
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_rejects_bad_input(device):
    w = torch.zeros(3, 2, device=device)
    with pytest.raises(ValueError):
        power_iteration_linear(w, torch.zeros(3, device=device), 1)
    with pytest.raises(ValueError):
        power_iteration_linear([w], [], 1)
    with pytest.raises(ValueError):
        power_iteration_linear(w, torch.zeros(2, device=device), -1)


def test_backward_grid_fits_cuda_limits():
    """Chunks of a layer on grid axis x (≤ 2³¹ − 1), layers on y (≤ 65,535): an 8192×8193
    layer needs 65,544 chunks of 1024, which axis y would refuse on a GPU."""
    from gloro_fast.kernels._utils import MAX_GRID_X, MAX_GRID_YZ
    from gloro_fast.kernels.power_iteration_linear import backward_grids

    grids = backward_grids(3, 8192 * 8193)
    assert grids == [(0, (65544, 3))]
    many = backward_grids(70000, 10)
    assert [l0 for l0, _ in many] == [0, 65535] and [g[1] for _, g in many] == [65535, 4465]
    for _, (x, y) in grids + many:
        assert 1 <= x <= MAX_GRID_X and 1 <= y <= MAX_GRID_YZ


def test_backward_in_several_launches(device, gen, monkeypatch):
    """The layer offset of each launch: with 2 layers per launch, 5 layers take 3 launches."""
    import gloro_fast.kernels.power_iteration_linear as pl

    monkeypatch.setattr(pl, "MAX_GRID_YZ", 2)
    assert [l0 for l0, _ in pl.backward_grids(5, 30)] == [0, 2, 4]
    weights, iterates = _layers([(5, 4), (2, 7), (3, 3), (6, 1), (1, 9)], F64, device, gen)
    _compare(weights, iterates, 2, gen, 1e-10)
