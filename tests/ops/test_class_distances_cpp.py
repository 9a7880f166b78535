"""Compiled class_distances (C++ CPU kernels) against the reference backend, opcheck, dispatch."""
from __future__ import annotations

import pytest
import torch

from gloro_fast.ops import class_distances, class_distances_reference
from tests.ops.cpp_helpers import requires_cpu_kernels

pytestmark = requires_cpu_kernels("class_distances")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def forward_backward(weight, exact, grad=None):
    """D and dL/dW for L = <D, grad> (grad=None: L = D.sum(), an expanded stride-0 gradient)."""
    w = weight.detach().clone().requires_grad_(True)
    d = class_distances(w, exact=exact)
    if grad is None:
        d.sum().backward()
    else:
        d.backward(grad)
    return d.detach(), w.grad


def _reference_cases():
    """(exact, C, d, dtype) grid, minus two combinations left out on purpose: C=1000 ×
    d=2048 runs only as Gram float32 (the others take seconds each and add no coverage), and
    C=1000 × d=1 Gram float32 is ill-conditioned (1000 points on a line: any float32 Gram
    form loses ~ulp·C² relative accuracy on the closest pairs; the exact case covers it)."""
    for exact in (False, True):
        for c in (2, 10, 1000):
            for d in (1, 33, 2048):
                for dtype in (torch.float32, torch.float64):
                    if c == 1000 and d == 2048 and (exact or dtype == torch.float64):
                        continue
                    if c == 1000 and d == 1 and not exact and dtype == torch.float32:
                        continue
                    name = f"{'exact' if exact else 'gram'}-C{c}-d{d}-{str(dtype)[6:]}"
                    yield pytest.param(exact, c, d, dtype, id=name)


@pytest.mark.parametrize("exact, c, d, dtype", list(_reference_cases()))
def test_matches_reference(exact, c, d, dtype, gen, backend):
    if d == 1:
        # random points on a line lie ~1/C² apart, where any rounding of D swamps the
        # gradient (w_j − w_i)/D_ji: use a shuffled grid with noise, gaps ≥ 0.5
        w = (torch.randperm(c, generator=gen) + 0.5 * torch.rand(c, generator=gen)).to(dtype)[:, None]
    else:
        w = torch.randn(c, d, generator=gen, dtype=dtype)
    g = torch.randn(c, c, generator=gen, dtype=dtype)
    # float32 is compared with the float64 reference of the same inputs (the truth): the
    # float32 Gram forms of both backends round differently, neither is the better answer
    ref_d, ref_g = backend("reference", forward_backward, w.double(), exact, g.double())
    ref_d, ref_g = ref_d.to(dtype), ref_g.to(dtype)
    out_d, out_g = backend("cpp", forward_backward, w, exact, g)
    assert out_d.shape == (c, c) and out_d.dtype == dtype
    assert torch.equal(torch.diagonal(out_d), torch.zeros(c, dtype=dtype))
    assert torch.equal(out_d, out_d.t())  # symmetric by construction
    scale = max(1.0, float(ref_d.abs().max()))
    torch.testing.assert_close(out_d, ref_d, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)
    gscale = max(1.0, float(ref_g.abs().max()))
    torch.testing.assert_close(out_g, ref_g, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * gscale)


@pytest.mark.parametrize("exact", [False, True], ids=["gram", "exact"])
@pytest.mark.parametrize("c", [3, 40])
def test_non_contiguous_and_expanded_grad(exact, c, gen, backend):
    base = torch.randn(17, 2 * c, generator=gen, dtype=torch.float64)
    for w in (base.t(), base[:, ::2].t(), base.t()[::2]):  # transposed / strided views
        assert not w.is_contiguous()
        ref_d, ref_g = backend("reference", forward_backward, w, exact)  # .sum(): stride-0 grad
        out_d, out_g = backend("cpp", forward_backward, w, exact)
        torch.testing.assert_close(out_d, ref_d, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_g, ref_g, rtol=1e-10, atol=1e-10)
        # a transposed (non-contiguous) incoming gradient
        g = torch.randn(w.shape[0], w.shape[0], generator=gen, dtype=torch.float64).t()
        ref_d, ref_g = backend("reference", forward_backward, w, exact, g)
        out_d, out_g = backend("cpp", forward_backward, w, exact, g)
        torch.testing.assert_close(out_g, ref_g, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("exact", [False, True], ids=["gram", "exact"])
def test_duplicate_rows_zero_distance_zero_grad(exact, gen, backend):
    w = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    w[3] = w[7]
    out_d, out_g = backend("cpp", forward_backward, w, exact)
    ref_d, ref_g = backend("reference", forward_backward, w, exact)
    assert torch.isfinite(out_g).all()
    assert float(out_d[3, 7]) <= 1e-6 and float(out_d[7, 3]) <= 1e-6
    torch.testing.assert_close(out_g, ref_g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_accumulates_in_float32(dtype, gen, backend):
    w = torch.randn(40, 64, generator=gen).to(dtype)
    out = backend("cpp", class_distances, w)
    assert out.dtype == dtype
    ref = class_distances_reference(w.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def _sample_weights(gen):
    return [
        torch.randn(2, 1, generator=gen, dtype=torch.float64),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(30, 7, generator=gen, dtype=torch.float32),
    ]


@pytest.mark.parametrize("exact", [False, True], ids=["gram", "exact"])
def test_opcheck_forward(exact, gen):
    for w in _sample_weights(gen):
        torch.library.opcheck(torch.ops.gloro_fast.class_distances.default, (w.requires_grad_(True), exact))
        torch.library.opcheck(torch.ops.gloro_fast.class_distances.default, (w.detach(), exact))


def test_opcheck_backward(gen):
    for w in _sample_weights(gen):
        d = torch.ops.gloro_fast.class_distances(w, False)
        g = torch.randn(d.shape, generator=gen, dtype=w.dtype)
        torch.library.opcheck(torch.ops.gloro_fast.class_distances_backward.default, (g, w, d))
        # an expanded, stride-0 gradient
        torch.library.opcheck(torch.ops.gloro_fast.class_distances_backward.default,
                              (torch.ones((), dtype=w.dtype).expand_as(d), w, d))


def test_dispatch_uses_compiled_op(gen, backend):
    w = torch.randn(12, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(name):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            backend(name, lambda: class_distances(w).sum().backward())
        return {e.key for e in prof.key_averages()}

    names = run("cpp")
    assert "gloro_fast::class_distances" in names
    assert "gloro_fast::class_distances_backward" in names
    assert not any(n.startswith("gloro_fast::") for n in run("reference"))
    assert "gloro_fast::class_distances" in run("auto")  # auto picks the compiled CPU kernel


def test_kernel_checks_its_inputs():
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.gloro_fast.class_distances(torch.randn(3), False)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.gloro_fast.class_distances(torch.ones(3, 2, dtype=torch.int64), False)
    w = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.gloro_fast.class_distances_backward(torch.randn(2, 2), w, torch.randn(3, 3))


@pytest.mark.parametrize("exact", [False, True], ids=["gram", "exact"])
def test_torch_compile_with_cpp_backend(exact, gen, backend):
    w = torch.randn(30, 6, generator=gen, dtype=torch.float64)

    def step(w):
        return class_distances(w, exact=exact).sum()

    def run(fn):
        ww = w.clone().requires_grad_(True)
        loss = fn(ww)
        loss.backward()
        return loss.detach(), ww.grad

    ref = backend("reference", run, step)
    torch._dynamo.reset()
    out = backend("cpp", run, torch.compile(step, backend="aot_eager", fullgraph=True))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
