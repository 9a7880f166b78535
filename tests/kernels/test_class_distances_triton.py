"""Triton class_distances (Gram and exact kernels, backward) against the reference: through
the public op with the triton backend selected, and the kernels alone (as the backend table
holds them)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_usable", "triton_backend")

import gloro_fast.kernels.class_distances  # noqa: E402,F401  (registers the Triton kernels)
from gloro_fast.ops import class_distances, class_distances_reference, registry  # noqa: E402

F64 = torch.float64
TRITON = registry.kernels("class_distances", "triton")


# non-powers of 2, C = 1 and 2, d = 1, tails in both tile axes (tiles are 32×32×32 / 16³)
SHAPES = [(1, 1), (2, 1), (2, 5), (7, 3), (19, 33), (37, 2), (40, 17)]


def _weight(shape, dtype, device, gen, requires_grad=False):
    w = torch.randn(*shape, generator=gen, dtype=F64).to(dtype=dtype, device=device)
    return w.requires_grad_(requires_grad)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_float64_matches_reference(shape, exact, device, gen):
    w = _weight(shape, F64, device, gen)
    out = class_distances(w, exact=exact)
    ref = class_distances_reference(w.cpu(), exact=exact)
    assert out.shape == ref.shape and out.dtype == F64
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)
    assert (out.diagonal() == 0).all()
    torch.testing.assert_close(out, out.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
)
def test_forward_low_precision(dtype, tol, exact, device, gen):
    w = _weight((23, 45), dtype, device, gen)
    out = class_distances(w, exact=exact)
    assert out.dtype == dtype
    ref = class_distances_reference(w.double().cpu(), exact=True)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.max().item())


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("shape", [(2, 1), (9, 4), (37, 21)])
def test_backward_float64(shape, exact, device, gen):
    w = _weight(shape, F64, device, gen, requires_grad=True)
    w_ref = w.detach().cpu().requires_grad_()
    g = torch.randn(shape[0], shape[0], generator=gen, dtype=F64)
    (class_distances(w, exact=exact) * g.to(device)).sum().backward()
    (class_distances_reference(w_ref, exact=exact) * g).sum().backward()
    torch.testing.assert_close(w.grad.cpu(), w_ref.grad, rtol=1e-9, atol=1e-9)


def test_backward_expanded_gradient(device, gen):
    """``.sum()`` sends back a stride-0 gradient: the kernel must not read it as C×C memory."""
    w = _weight((13, 6), F64, device, gen, requires_grad=True)
    w_ref = w.detach().cpu().requires_grad_()
    class_distances(w).sum().backward()
    class_distances_reference(w_ref).sum().backward()
    torch.testing.assert_close(w.grad.cpu(), w_ref.grad, rtol=1e-9, atol=1e-9)
    # and the launcher directly, with an expanded and a transposed gradient
    d = TRITON.forward(w.detach(), True)
    g = torch.randn(13, 13, generator=gen, dtype=F64).to(device)
    for grad in (torch.ones((), dtype=F64, device=device).expand(13, 13), g.t()):
        expect = torch.autograd.grad(
            (class_distances_reference(w_ref, exact=True) * grad.cpu()).sum(), w_ref
        )[0]
        torch.testing.assert_close(
            TRITON.backward(grad, w.detach(), d).cpu(), expect, rtol=1e-9, atol=1e-9
        )


def test_backward_float32(device, gen):
    w = _weight((30, 12), torch.float32, device, gen, requires_grad=True)
    w_ref = w.detach().double().cpu().requires_grad_()
    g = torch.randn(30, 30, generator=gen, dtype=F64)
    (class_distances(w) * g.float().to(device)).sum().backward()
    (class_distances_reference(w_ref, exact=True) * g.float().double()).sum().backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.double().cpu(), w_ref.grad, rtol=1e-4, atol=1e-4)


def test_duplicate_rows_have_zero_distance_and_gradient_term(device, gen):
    w = _weight((5, 3), F64, device, gen)
    w[3] = w[1]
    w.requires_grad_()
    d = class_distances(w, exact=True)
    assert d[1, 3] == 0 and d[3, 1] == 0
    w_ref = w.detach().cpu().requires_grad_()
    d.sum().backward()
    class_distances_reference(w_ref, exact=True).sum().backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad.cpu(), w_ref.grad, rtol=1e-10, atol=1e-10)


def test_non_contiguous_weight(device, gen):
    w = _weight((8, 11), F64, device, gen).t()  # (11, 8), transposed strides
    torch.testing.assert_close(
        class_distances(w).cpu(), class_distances_reference(w.cpu()), rtol=1e-10, atol=1e-10
    )


def test_custom_op_registration(device, gen):
    w = _weight((6, 5), torch.float32, device, gen, requires_grad=True)
    torch.library.opcheck(
        torch.ops.gloro_fast.class_distances.default,
        (w, False),
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_rejects_bad_input(device):
    with pytest.raises(ValueError):
        class_distances(torch.zeros(3, device=device))
    with pytest.raises(ValueError):
        class_distances(torch.zeros(0, 3, device=device))
    with pytest.raises(TypeError):
        class_distances(torch.zeros(3, 3, dtype=torch.int32, device=device))


# --- the spec's mode choice (torch.cdist, C++ backends): direct differences below 26 classes,
# centred Gram from 26 on; rows sharing a large offset are where an uncentred Gram form fails
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("c", [10, 25, 26, 40])
def test_float32_rows_sharing_an_offset(c, exact, device, gen):
    base = torch.randn(c, 64, generator=gen, dtype=F64)
    w64 = base + 100.0  # every row 100·1 + noise: ‖w‖² ≈ 6.4e5, distances ≈ 11
    ref = class_distances_reference(w64, exact=True)
    out = class_distances(w64.float().to(device), exact=exact).double().cpu()
    off = ~torch.eye(c, dtype=torch.bool)
    rel = ((out - ref).abs()[off] / ref[off]).max().item()
    # float32 rounding of the inputs alone moves a distance by ~ulp(100)/11 ≈ 1e-6 relative; the
    # uncentred Gram form loses ~ulp(‖w‖²)/D² ≈ 5e-4 relative, which this bound rejects
    assert rel < 2e-5, rel


@pytest.mark.parametrize("c", [10, 40])
def test_float32_offset_rows_gradient(c, device, gen):
    w64 = torch.randn(c, 48, generator=gen, dtype=F64) + 100.0
    g = torch.randn(c, c, generator=gen, dtype=F64)
    w = w64.float().to(device).requires_grad_()
    (class_distances(w) * g.float().to(device)).sum().backward()
    w_ref = w64.clone().requires_grad_()
    (class_distances_reference(w_ref, exact=True) * g).sum().backward()
    # the gradient terms (w_j − w_i)/D_ji are O(1): without centring, diag(S1)W − SW cancels
    # two terms of size ~100·ΣS and keeps ~1e-3 of absolute error
    torch.testing.assert_close(w.grad.double().cpu(), w_ref.grad, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("c", [25, 26])
def test_mode_threshold_matches_the_spec(c, device, gen):
    from gloro_fast.kernels.class_distances import GRAM_MIN_CLASSES, uses_gram

    assert GRAM_MIN_CLASSES == 26  # torch.cdist: the GEMM form above 25 rows
    assert uses_gram(c, exact=False) == (c >= 26) and not uses_gram(c, exact=True)
    w = _weight((c, 7), F64, device, gen)
    torch.testing.assert_close(class_distances(w).cpu(), class_distances_reference(w.cpu()), rtol=1e-12, atol=1e-12)
