"""Triton-epilogue power_iteration_conv (single and batched layers) against the reference:
through the public ops with the triton backend selected, and the kernels alone (as the
backend table holds them: N layers stacked on axis 0)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_usable", "triton_backend")

from gloro_fast import ops  # noqa: E402
from gloro_fast.kernels.power_iteration_conv import conv2d_ieee, normalize_segments, segment_norms  # noqa: E402
from gloro_fast.ops import power_iteration_conv_reference, registry  # noqa: E402
from tests.helpers import explicit_matrix  # noqa: E402

F64 = torch.float64
TRITON = registry.kernels("power_iteration_conv", "triton")



def power_iteration_conv(w, u, n_iter, stride=1, padding=0, dilation=1, groups=1, residual=False):
    return ops.power_iteration_conv(w, u, n_iter, stride=stride, padding=padding, dilation=dilation,
                                    groups=groups, residual=residual)


def power_iteration_conv_batched(ws, us, n_iter, stride=1, padding=0, dilation=1, groups=1, residual=False):
    return ops.power_iteration_conv_batched(ws, us, n_iter, stride=stride, padding=padding, dilation=dilation,
                                            groups=groups, residual=residual)

# weight shape, input (c_in, H, W), stride, pads (top, bottom, left, right), dilation, groups, residual
CASES = [
    ((4, 3, 3, 3), (3, 7, 6), (1, 1), (1, 1, 1, 1), (1, 1), 1, False),
    ((6, 2, 4, 4), (4, 8, 9), (2, 2), (1, 2, 0, 1), (1, 1), 2, False),  # asymmetric, grouped, strided
    ((3, 3, 3, 3), (3, 5, 5), (1, 1), (2, 2, 2, 2), (2, 2), 1, True),  # dilated LiResNet block
    ((2, 1, 1, 1), (1, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, False),  # 1×1 everything
    ((5, 2, 2, 3), (2, 7, 8), (1, 2), (0, 1, 1, 1), (1, 1), 1, False),
]


def _unit(shape, dtype, device, gen):
    u = torch.randn(1, *shape, generator=gen, dtype=F64)
    return (u / u.norm()).to(dtype=dtype, device=device)


def _check(case, n_iter, dtype, tol, device, gen):
    wshape, ushape, stride, pads, dilation, groups, residual = case
    w = torch.randn(*wshape, generator=gen, dtype=F64).to(dtype=dtype, device=device).requires_grad_()
    u0 = _unit(ushape, dtype, device, gen)
    w_ref = w.detach().double().cpu().requires_grad_()
    u, sigma = power_iteration_conv(w, u0, n_iter, stride, pads, dilation, groups, residual)
    ru, rs = power_iteration_conv_reference(
        w_ref, u0.double().cpu(), n_iter, stride, pads, dilation, groups, residual
    )
    sigma.backward()
    rs.backward()
    assert u.shape == u0.shape and u.dtype == dtype and not u.requires_grad
    assert sigma.shape == () and sigma.dtype == dtype
    torch.testing.assert_close(u.double().cpu(), ru, rtol=tol, atol=tol)
    torch.testing.assert_close(sigma.double().cpu(), rs, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double().cpu(), w_ref.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_iter", [0, 2])
@pytest.mark.parametrize("case", CASES)
def test_float64_matches_reference(case, n_iter, device, gen):
    _check(case, n_iter, F64, 1e-10, device, gen)


def test_float32(device, gen):
    _check(CASES[1], 3, torch.float32, 1e-5, device, gen)


def test_batched_equal_shapes(device, gen):
    wshape, ushape, stride, pads, dilation, groups, residual = CASES[1]
    ws = [torch.randn(*wshape, generator=gen, dtype=F64).to(device).requires_grad_() for _ in range(3)]
    us0 = [_unit(ushape, F64, device, gen) for _ in range(3)]
    us, sigmas = power_iteration_conv_batched(ws, us0, 2, stride, pads, dilation, groups, residual)
    (sigmas[0] + 2.0 * sigmas[2]).backward()  # layer 1 gets no gradient
    for k, coeff in enumerate((1.0, 0.0, 2.0)):
        w_ref = ws[k].detach().cpu().requires_grad_()
        ru, rs = power_iteration_conv_reference(
            w_ref, us0[k].cpu(), 2, stride, pads, dilation, groups, residual
        )
        rs.backward()
        torch.testing.assert_close(us[k].cpu(), ru, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sigmas[k].cpu(), rs, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ws[k].grad.cpu(), coeff * w_ref.grad, rtol=1e-10, atol=1e-10)


def test_converges_to_operator_norm(device, gen):
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64).to(device)
    u0 = _unit((2, 5, 4), F64, device, gen)
    _, sigma = power_iteration_conv(w, u0, 25, 2, (1, 0, 1, 1), 1, 1, False)
    from gloro_fast.ops.convolution import conv_operator

    mat = explicit_matrix(lambda x: conv_operator(x, w.cpu(), (2, 2), (1, 0, 1, 1), (1, 1), 1), (2, 5, 4))
    true = torch.linalg.matrix_norm(mat, ord=2)
    assert float(sigma) <= float(true) * (1 + 1e-12)
    assert float(sigma) >= 0.99 * float(true)


def test_zero_kernel_keeps_iterate(device, gen):
    w = torch.zeros(2, 2, 3, 3, dtype=F64, device=device, requires_grad=True)
    u0 = _unit((2, 4, 4), F64, device, gen)
    u, sigma = power_iteration_conv(w, u0, 2, 1, 1, 1, 1, False)
    assert torch.equal(u, u0) and float(sigma.detach()) == 0.0
    sigma.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("value", [3e30, float("inf"), float("nan")])
def test_overflowing_or_non_finite_kernel_keeps_iterate(device, gen, value):
    w = torch.ones(2, 2, 3, 3, device=device)
    w[1, 0, 1, 1] = value
    u0 = _unit((2, 4, 4), torch.float32, device, gen)
    u, _ = power_iteration_conv(w, u0, 2, 1, 1, 1, 1, False)
    assert torch.equal(u, u0)


def test_segment_kernels(device, gen):
    x = torch.randn(3, 50, generator=gen, dtype=F64).to(device)
    x[1] = 0.0
    old = torch.randn(3, 50, generator=gen, dtype=F64).to(device)
    out = normalize_segments(x, old, 3)
    torch.testing.assert_close(out[0], x[0] / x[0].norm())
    assert torch.equal(out[1], old[1])
    torch.testing.assert_close(segment_norms(x, 3).cpu(), x.cpu().norm(dim=1))


def test_kernels_stack_layers_on_axis_0(device, gen):
    """The op's contract: N layers' iterates (N, C_in, H, W), kernels stacked on the output
    axis; the backward takes a stride-0 gradient."""
    wshape, ushape, stride, pads, dilation, groups, residual = CASES[1]
    ws = [torch.randn(*wshape, generator=gen, dtype=F64).to(device) for _ in range(2)]
    us0 = [_unit(ushape, F64, device, gen) for _ in range(2)]
    geometry = (list(stride), list(pads), list(dilation), groups, residual)
    weight, iterate = torch.cat(ws), torch.cat(us0)
    u, sigma, image = TRITON.forward(weight, iterate, 1, *geometry)
    assert u.shape == iterate.shape and sigma.shape == (2,)
    torch.testing.assert_close(torch.linalg.vector_norm(image.flatten(1), dim=1), sigma, rtol=1e-12, atol=1e-12)
    grad = torch.ones((), dtype=F64, device=device).expand(2)  # stride 0
    gw = TRITON.backward(grad, weight, u, sigma, image, *geometry)
    for k in range(2):
        w_ref = ws[k].cpu().requires_grad_()
        ru, rs = power_iteration_conv_reference(w_ref, us0[k].cpu(), 1, stride, pads, dilation, groups, residual)
        rs.backward()
        torch.testing.assert_close(u[k : k + 1].cpu(), ru, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sigma[k].cpu(), rs.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gw[k * wshape[0] : (k + 1) * wshape[0]].cpu(), w_ref.grad, rtol=1e-10, atol=1e-10)


def test_custom_op_registration(device, gen):
    """The one op (schema, autograd registration) with the Triton kernels behind it."""
    w = torch.randn(2, 2, 3, 3, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(
        torch.ops.gloro_fast.power_iteration_conv.default,
        (w, _unit((2, 4, 4), torch.float32, device, gen), 1, [1, 1], [1, 1, 1, 1], [1, 1], 1, False),
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_rejects_bad_input(device):
    w = torch.zeros(2, 2, 3, 3, device=device)
    with pytest.raises(ValueError):
        power_iteration_conv(w, torch.zeros(1, 3, 4, 4, device=device), 1)
    with pytest.raises(ValueError):
        power_iteration_conv_batched([w, torch.zeros(2, 2, 1, 1, device=device)],
                                     [torch.zeros(1, 2, 4, 4, device=device)] * 2, 1)
    with pytest.raises(ValueError):
        power_iteration_conv(w, torch.zeros(1, 2, 4, 4, device=device), 1, padding=(1, 2, 3))


def test_scale_grid_fits_cuda_limits():
    """Chunks of a segment on grid axis x, segments on y in launches of ≤ 65,535: a segment
    of 40 M elements has 78,125 chunks of 512, which axis y would refuse on a GPU."""
    from gloro_fast.kernels.power_iteration_conv import scale_grids

    assert scale_grids(3) == [(0, 3)]
    assert scale_grids(70000) == [(0, 65535), (65535, 4465)]


def test_scale_in_several_launches(device, gen, monkeypatch):
    import gloro_fast.kernels.power_iteration_conv as pc

    monkeypatch.setattr(pc, "MAX_GRID_YZ", 2)
    y = torch.randn(5, 37, generator=gen, dtype=F64).to(device)
    g = torch.randn(5, generator=gen, dtype=F64).to(device)
    sigma = torch.tensor([1.5, 0.0, 2.0, 0.5, 3.0], dtype=F64, device=device)
    out = pc.scale_segments(y, g, sigma, 5)
    want = torch.where(sigma > 0, g / sigma.clamp_min(1e-300), torch.zeros_like(g))[:, None] * y
    torch.testing.assert_close(out.cpu(), want.cpu(), rtol=1e-14, atol=0)


# weight shape, input (c_in, H, W), stride, pads, dilation, groups
WGRAD_CASES = [
    ((4, 3, 3, 3), (3, 7, 6), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((6, 2, 4, 4), (4, 8, 9), (2, 2), (1, 2, 0, 1), (1, 1), 2),
    ((3, 3, 3, 3), (3, 9, 9), (2, 1), (2, 2, 2, 2), (2, 2), 1),
    ((8, 1, 3, 2), (4, 6, 7), (1, 3), (0, 1, 1, 0), (1, 2), 4),
]


@pytest.mark.parametrize("case", WGRAD_CASES)
def test_weight_gradient_as_one_convolution(case, gen):
    """conv2d_weight_ieee (the weight gradient as ONE convolution, which takes the IEEE
    precision of conv2d_ieee) against torch's own weight gradient, on CPU in float64."""
    from gloro_fast.kernels.power_iteration_conv import conv2d_weight_ieee

    wshape, ushape, stride, pads, dilation, groups = case
    x = torch.randn(1, *ushape, generator=gen, dtype=F64)
    w = torch.randn(*wshape, generator=gen, dtype=F64, requires_grad=True)
    top, bottom, left, right = pads
    padded = torch.nn.functional.pad(x, (left, right, top, bottom))
    y = torch.nn.functional.conv2d(padded, w, None, stride, 0, dilation, groups)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    (want,) = torch.autograd.grad(y, w, gy)
    got = conv2d_weight_ieee(padded, gy, wshape, stride, dilation, groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv2d_ieee(gen):
    """The IEEE convolution: equal to aten.convolution off CUDA float32 (forward and transposed)."""
    x = torch.randn(1, 4, 6, 5, generator=gen)
    w = torch.randn(6, 2, 3, 3, generator=gen)
    out = conv2d_ieee(x, w, [2, 1], [1, 0], [1, 1], 2, False, [0, 0])
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, None, (2, 1), (1, 0), 1, 2))
    back = conv2d_ieee(out, w, [2, 1], [1, 0], [1, 1], 2, True, [1, 0])
    torch.testing.assert_close(back, torch.nn.functional.conv_transpose2d(out, w, None, (2, 1), (1, 0), (1, 0), 2))
