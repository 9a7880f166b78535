"""Triton bottom_logit (forward and backward) against the reference and a per-sample loop:
through the public op with the triton backend selected, and the kernels alone (as the
backend table holds them)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_usable", "triton_backend")

import gloro_fast.kernels.bottom_logit as bl  # noqa: E402
from gloro_fast.ops import bottom_logit, bottom_logit_reference, registry  # noqa: E402
from tests.helpers import OpLog  # noqa: E402

F64 = torch.float64
TRITON = registry.kernels("bottom_logit", "triton")



def bottom_logit_forward(f, d, k, eps, classes):
    """The Triton forward kernel alone: (f_⊥, i*, j)."""
    return TRITON.forward(f, d, k, eps, classes)


def bottom_logit_backward(grad, i_star, j, d, k, eps):
    """The Triton backward kernel alone: gradients into (f, D, K)."""
    return TRITON.backward(grad, d, k, eps, i_star, j, d.shape[0])


def _inputs(B, C, dtype, device, gen, ties=True):
    f = torch.randn(B, C, generator=gen, dtype=F64) * 2
    if ties:  # integer logits: many ties, both for the argmax and for the ⊥ maximum
        f = f.round()
    d = torch.rand(C, C, generator=gen, dtype=F64)
    d = (d + d.t()).fill_diagonal_(0.0)
    if ties:
        d = (d * 4).round() / 4
    k = torch.tensor(1.5, dtype=F64)
    return [t.to(dtype=dtype, device=device) for t in (f, d, k)]


def _run(f, d, k, eps, classes, grad=None):
    """Kernel and float64 reference outputs and gradients (into f, D, K)."""
    leaves = [t.detach().clone().requires_grad_() for t in (f, d, k)]
    refs = [t.detach().double().cpu().requires_grad_() for t in (f, d, k)]
    fb, i_star = bottom_logit(*leaves, eps, classes)
    rb, ri = bottom_logit_reference(*refs, eps, None if classes is None else classes.cpu().long())
    if grad is None:
        fb.sum().backward()  # stride-0 upstream gradient
        rb.sum().backward()
    else:
        (fb * grad.to(fb)).sum().backward()
        (rb * grad.double().cpu()).sum().backward()
    return (fb, i_star, [t.grad for t in leaves]), (rb, ri, [t.grad for t in refs])


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("B, C", [(1, 2), (5, 2), (7, 3), (33, 10), (4, 300)])
def test_float64_matches_reference(B, C, given, device, gen):
    f, d, k = _inputs(B, C, F64, device, gen)
    classes = torch.randint(0, C, (B,), generator=gen).to(device) if given else None
    (fb, i_star, grads), (rb, ri, rgrads) = _run(f, d, k, 0.3, classes)
    assert fb.dtype == F64 and i_star.dtype == torch.int64
    torch.testing.assert_close(fb.cpu(), rb, rtol=1e-12, atol=1e-12)
    assert torch.equal(i_star.cpu(), ri)
    for got, want in zip(grads, rgrads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]
)
def test_low_precision(dtype, tol, device, gen):
    # continuous values (no exact ties), so rounding does not change i*
    f, d, k = _inputs(16, 11, dtype, device, gen, ties=False)
    g = torch.randn(16, generator=gen, dtype=F64)
    (fb, i_star, grads), (rb, ri, rgrads) = _run(f, d, k, 0.25, None, grad=g)
    assert fb.dtype == dtype and all(t.dtype == dtype for t in grads)
    assert torch.equal(i_star.cpu(), ri)
    torch.testing.assert_close(fb.double().cpu(), rb, rtol=tol, atol=tol)
    for got, want in zip(grads, rgrads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * 4)


def test_ties_mask_only_the_reference_class(device):
    """Two classes tied for the argmax: j is the lower one, and the other stays a competitor."""
    f = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=F64, device=device)
    d = torch.zeros(4, 4, dtype=F64, device=device)
    k = torch.tensor(1.0, dtype=F64, device=device)
    fb, i_star = bottom_logit(f, d, k, 0.0)
    assert fb.tolist() == [3.0, 2.0]
    assert i_star.tolist() == [2, 1]  # j = 1 (row 0) / 0 (row 1) masked; lowest competitor wins ties


def test_per_sample_loop(device, gen):
    """f_⊥ = max_{i≠j} (f_i + ε K D_ji) by a plain loop."""
    f, d, k = _inputs(6, 5, F64, device, gen, ties=False)
    fb, i_star = bottom_logit(f, d, k, 0.7)
    for b in range(6):
        j = int(f[b].argmax())
        vals = [(float(f[b, i] + 0.7 * k * d[j, i]), i) for i in range(5) if i != j]
        best = max(v for v, _ in vals)
        assert abs(float(fb[b]) - best) < 1e-12
        assert int(i_star[b]) == min(i for v, i in vals if v == best)


def test_int32_classes_and_kernel_outputs(device, gen):
    f, d, k = _inputs(9, 6, torch.float32, device, gen)
    classes = torch.randint(0, 6, (9,), generator=gen)
    fb32, i32 = bottom_logit(f, d, k, 0.1, classes.to(device=device, dtype=torch.int32))
    fb64, i64 = bottom_logit(f, d, k, 0.1, classes.to(device))
    assert torch.equal(fb32, fb64) and torch.equal(i32, i64)
    _, _, j = bottom_logit_forward(f, d, k, 0.1, None)
    assert torch.equal(j.cpu(), f.cpu().argmax(1))
    _, _, j = bottom_logit_forward(f, d, k, 0.1, classes.to(device))
    assert torch.equal(j.cpu(), classes)


def test_backward_launcher_expanded_gradient(device, gen):
    f, d, k = _inputs(12, 7, F64, device, gen)
    _, i_star, j = bottom_logit_forward(f, d, k, 0.5, None)
    grad = torch.full((), 0.75, dtype=F64, device=device).expand(12)  # stride 0
    gf, gd, gk = bottom_logit_backward(grad, i_star, j, d, k, 0.5)
    refs = [t.detach().cpu().requires_grad_() for t in (f, d, k)]
    rb, _ = bottom_logit_reference(*refs, 0.5)
    (rb * 0.75).sum().backward()
    for got, ref in zip((gf, gd, gk), refs):
        torch.testing.assert_close(got.cpu(), ref.grad, rtol=1e-12, atol=1e-12)


def test_float_lipschitz_and_epsilon_zero(device, gen):
    f, d, _ = _inputs(5, 4, F64, device, gen)
    fb, i_star = bottom_logit(f, d, 2.0, 0.0)
    rb, ri = bottom_logit_reference(f.cpu(), d.cpu(), torch.tensor(2.0, dtype=F64), 0.0)
    torch.testing.assert_close(fb.cpu(), rb)
    assert torch.equal(i_star.cpu(), ri)


def test_custom_op_registration(device, gen):
    """The one op (schema, autograd registration) with the Triton kernels behind it."""
    f, d, k = _inputs(4, 3, torch.float32, device, gen)
    torch.library.opcheck(
        torch.ops.gloro_fast.bottom_logit.default,
        (f.requires_grad_(), d.requires_grad_(), k.requires_grad_(), 0.1, None),
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_classes_out_of_range(device, gen, debug_checks):
    """The op rejects them (a value check: debug mode); the kernels called directly give f_⊥ = NaN and i* = −1 for those
    rows (never an index outside D), and their backward skips them."""
    f, d, k = _inputs(3, 4, F64, device, gen, ties=False)
    bad = torch.tensor([0, 4, -1], device=device)
    with pytest.raises(ValueError, match="classes"):
        bottom_logit(f, d, k, 0.1, bad)
    fb, i_star, j = bottom_logit_forward(f, d, k, 0.1, bad)
    rb, ri = bottom_logit_reference(f[:1].cpu(), d.cpu(), k.cpu(), 0.1, torch.tensor([0]))
    torch.testing.assert_close(fb[:1].cpu(), rb, rtol=1e-12, atol=1e-12)
    assert torch.isnan(fb[1:]).all() and i_star.tolist() == [int(ri), -1, -1] and j.tolist() == [0, 4, -1]
    gf, gd, gk = bottom_logit_backward(torch.ones(3, dtype=F64, device=device), i_star, j, d, k, 0.1)
    assert gf[1:].abs().sum() == 0 and int((gd != 0).sum()) == 1


def test_rejects_bad_input(device):
    f = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError):
        bottom_logit(torch.zeros(2, 1, device=device), torch.zeros(1, 1, device=device), 1.0, 0.1)
    with pytest.raises(ValueError):
        bottom_logit(f, torch.zeros(2, 2, device=device), 1.0, 0.1)
    with pytest.raises(ValueError):
        bottom_logit(f, torch.zeros(3, 3, dtype=F64, device=device), 1.0, 0.1)


def test_autotune_key_leaves_the_batch_size_out():
    """A new batch size must not re-tune: the key is (C, HAS_CLASSES, FP64) only, and the
    wide-class configs keep BLOCK_B × 256 within the register budget of their warps."""
    narrow, wide = bl.forward_kernel(64), bl.forward_kernel(128)
    assert narrow is not wide and bl.forward_kernel(256) is wide and bl.forward_kernel(2) is narrow
    for kernel in (narrow, wide):
        assert list(kernel.keys) == ["C", "HAS_CLASSES", "FP64"]
    for config in bl.FORWARD_CONFIGS_WIDE:
        assert config.kwargs["BLOCK_B"] * bl.MAX_BLOCK_C <= 1024 * config.num_warps


def test_deterministic_mode_scatters_without_atomics(device, gen):
    """Under torch.use_deterministic_algorithms the ∂D scatter is an index_put_ (which torch
    runs deterministically) instead of float atomics; the values are the same."""
    f, d, k = _inputs(40, 3, F64, device, gen)  # 40 rows over 3 classes: cells shared by many rows
    _, i_star, j = bottom_logit_forward(f, d, k, 0.5, None)
    g = torch.randn(40, generator=gen, dtype=F64).to(device)

    with OpLog() as log:
        free = bottom_logit_backward(g, i_star, j, d, k, 0.5)
    assert not any("index_put" in n for n in log.names)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with OpLog() as log:
            fixed = bottom_logit_backward(g, i_star, j, d, k, 0.5)
    finally:
        torch.use_deterministic_algorithms(before)
    assert any("index_put" in n for n in log.names)
    refs = [t.detach().cpu().requires_grad_() for t in (f, d, k)]
    rb, _ = bottom_logit_reference(*refs, 0.5)
    (rb * g.cpu()).sum().backward()
    for a, b, ref in zip(free, fixed, refs):
        torch.testing.assert_close(a.cpu(), ref.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.cpu(), ref.grad, rtol=1e-12, atol=1e-12)
