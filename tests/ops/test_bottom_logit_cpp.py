"""Compiled bottom_logit (C++ CPU kernels) against the reference backend, opcheck, dispatch."""
from __future__ import annotations

import pytest
import torch

from gloro_fast.ops import bottom_logit
from tests.ops.cpp_helpers import requires_cpu_kernels

pytestmark = requires_cpu_kernels("bottom_logit")
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def forward_backward(f, d, k, eps, classes=None, grad=None):
    """(f_bot, i*, df, dD, dK) for L = <f_bot, grad> (grad=None: L = f_bot.sum(), stride-0)."""
    f = f.detach().clone().requires_grad_(True)
    d = d.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    bot, star = bottom_logit(f, d, k, eps, classes)
    if f.shape[0] > 0:
        if grad is None:
            bot.sum().backward()
        else:
            bot.backward(grad)
    return bot.detach(), star, f.grad, d.grad, k.grad


def assert_same(out, ref, dtype):
    bot, star, gf, gd, gk = out
    rbot, rstar, rgf, rgd, rgk = ref
    assert bot.dtype == dtype and star.dtype == torch.int64 and bot.shape == star.shape == rbot.shape
    torch.testing.assert_close(bot, rbot, **TOL[dtype])
    assert torch.equal(star, rstar)
    for a, b in ((gf, rgf), (gd, rgd), (gk, rgk)):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TOL[dtype])


def random_problem(b, c, gen, dtype):
    f = torch.randn(b, c, generator=gen, dtype=dtype) * 3
    d = torch.rand(c, c, generator=gen, dtype=dtype) * 2  # any non-negative matrix will do
    d.fill_diagonal_(0)
    k = torch.tensor(1.7, dtype=dtype)
    return f, d, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c", [2, 10, 1000])
@pytest.mark.parametrize("b", [0, 1, 7, 256])
@pytest.mark.parametrize("given", [False, True], ids=["argmax", "classes"])
def test_matches_reference(given, b, c, dtype, gen, backend):
    f, d, k = random_problem(b, c, gen, dtype)
    classes = torch.randint(0, c, (b,), generator=gen) if given else None
    g = torch.randn(b, generator=gen, dtype=dtype)
    eps = 0.37
    ref = backend("reference", forward_backward, f, d, k, eps, classes, g)
    out = backend("cpp", forward_backward, f, d, k, eps, classes, g)
    assert_same(out, ref, dtype)
    ref = backend("reference", forward_backward, f, d, k, eps, classes)  # expanded stride-0 grad
    out = backend("cpp", forward_backward, f, d, k, eps, classes)
    assert_same(out, ref, dtype)


def test_non_contiguous_inputs(gen, backend):
    base = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    f = base[:, ::4]  # (9, 10), strided
    d = torch.rand(10, 10, generator=gen, dtype=torch.float64).t()  # transposed, not symmetric
    k = torch.tensor([0.5, 2.0], dtype=torch.float64)[1]  # a view with an offset
    classes = (torch.arange(18) % 10)[::2]
    assert not f.is_contiguous() and not d.is_contiguous() and not classes.is_contiguous()
    for cls in (None, classes):
        ref = backend("reference", forward_backward, f, d, k, 0.8, cls)
        out = backend("cpp", forward_backward, f, d, k, 0.8, cls)
        assert_same(out, ref, torch.float64)


def test_ties_lowest_index(backend):
    f64 = torch.float64
    # argmax ties: j is the lowest maximal index; only j is masked, so the tied class wins ⊥
    f = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0]], dtype=f64)
    d = torch.ones(4, 4, dtype=f64) - torch.eye(4, dtype=f64)
    for eps, k in ((0.0, 1.0), (0.5, 2.0), (1.0, 0.0)):
        kt = torch.tensor(k, dtype=f64)
        out = backend("cpp", forward_backward, f, d, kt, eps)
        ref = backend("reference", forward_backward, f, d, kt, eps)
        assert_same(out, ref, f64)
        assert out[1].tolist() == [2, 1, 3]  # j = 1, 0, 1; i* = lowest of the ties among i != j
        torch.testing.assert_close(out[0], torch.tensor([3.0, 2.0, 5.0], dtype=f64) + eps * k)


def test_explicit_classes_may_be_any_class(backend):
    f = torch.tensor([[0.0, 1.0, 2.0], [4.0, 1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]], dtype=torch.float64)
    k = torch.tensor(1.0, dtype=torch.float64)
    classes = torch.tensor([2, 2])
    out = backend("cpp", forward_backward, f, d, k, 0.5, classes)
    ref = backend("reference", forward_backward, f, d, k, 0.5, classes)
    assert_same(out, ref, torch.float64)
    # row 0: max(0 + 1.0, 1 + 1.5) = 2.5 at i=1; row 1: max(4 + 1.0, 1 + 1.5) = 5.0 at i=0
    assert out[0].tolist() == [2.5, 5.0] and out[1].tolist() == [1, 0]
    # the raw op reports the reference classes it used
    _, _, j = torch.ops.gloro_fast.bottom_logit(f, d, k, 0.5, classes)
    assert j.tolist() == [2, 2]
    _, _, j = torch.ops.gloro_fast.bottom_logit(f, d, k, 0.5, None)
    assert j.tolist() == [2, 0]


def test_shared_cells_accumulate_in_grad_distances(backend):
    # every row has the same (j, i*): grad_D[j, i*] must be the sum over rows (no lost updates)
    f = torch.tensor([[5.0, 1.0, 0.0]], dtype=torch.float64).repeat(300, 1)
    d = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor(2.0, dtype=torch.float64)
    g = torch.linspace(0.1, 1.0, 300, dtype=torch.float64)
    out = backend("cpp", forward_backward, f, d, k, 0.25, None, g)
    ref = backend("reference", forward_backward, f, d, k, 0.25, None, g)
    assert_same(out, ref, torch.float64)
    torch.testing.assert_close(out[3][0, 1], g.sum() * 0.25 * 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype, gen, backend):
    f, d, k = random_problem(16, 10, gen, torch.float32)
    out = backend("cpp", forward_backward, f.to(dtype), d.to(dtype), k.to(dtype), 0.3)
    ref = backend("reference", forward_backward, f.to(dtype).float(), d.to(dtype).float(), k.to(dtype).float(), 0.3)
    assert out[0].dtype == dtype
    torch.testing.assert_close(out[0].float(), ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[2].float(), ref[2], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[3].float(), ref[3], rtol=1e-2, atol=1e-2)


def test_torch_compile_with_cpp_backend(gen, backend):
    f, d, k = random_problem(8, 6, gen, torch.float64)

    def step(f, d, k):
        bot, star = bottom_logit(f, d, k, 0.3)
        return bot.sum(), star

    def run(fn):
        ff, dd, kk = (t.clone().requires_grad_(True) for t in (f, d, k))
        loss, star = fn(ff, dd, kk)
        loss.backward()
        return loss.detach(), star, ff.grad, dd.grad, kk.grad

    ref = backend("cpp", run, step)
    torch._dynamo.reset()
    out = backend("cpp", run, torch.compile(step, backend="aot_eager", fullgraph=True))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def _samples(gen):
    out = []
    for b, c, dtype in ((0, 3, torch.float64), (5, 2, torch.float64), (6, 7, torch.float32)):
        f, d, k = random_problem(b, c, gen, dtype)
        out.append((f, d, k, torch.randint(0, c, (b,), generator=gen)))
    return out


def test_opcheck_forward(gen):
    op = torch.ops.gloro_fast.bottom_logit.default
    for f, d, k, classes in _samples(gen):
        for cls in (None, classes):
            torch.library.opcheck(op, (f, d, k, 0.4, cls))
            args = (f.clone().requires_grad_(True), d.clone().requires_grad_(True), k.clone().requires_grad_(True))
            torch.library.opcheck(op, (*args, 0.4, cls))


def test_opcheck_backward(gen):
    op = torch.ops.gloro_fast.bottom_logit_backward.default
    for f, d, k, classes in _samples(gen):
        _, star, j = torch.ops.gloro_fast.bottom_logit(f, d, k, 0.4, None)
        b, c = f.shape
        g = torch.randn(b, generator=gen, dtype=f.dtype)
        torch.library.opcheck(op, (g, d, k, 0.4, star, j, c))
        torch.library.opcheck(op, (torch.ones((), dtype=f.dtype).expand(b), d, k, 0.4, star, j, c))


def test_dispatch_uses_compiled_op(gen, backend):
    f, d, k = random_problem(4, 5, gen, torch.float64)
    f.requires_grad_(True)

    def run(name):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            backend(name, lambda: bottom_logit(f, d, k, 0.2)[0].sum().backward())
        return {e.key for e in prof.key_averages()}

    names = run("cpp")
    assert "gloro_fast::bottom_logit" in names and "gloro_fast::bottom_logit_backward" in names
    assert not any(n.startswith("gloro_fast::") for n in run("reference"))
    assert "gloro_fast::bottom_logit" in run("auto")


def test_kernel_checks_its_inputs():
    f = torch.randn(3, 4)
    d = torch.rand(4, 4)
    k = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.gloro_fast.bottom_logit(f, d, k, 0.1, torch.tensor([0, 4, 1]))
    with pytest.raises(RuntimeError, match="distances must have shape"):
        torch.ops.gloro_fast.bottom_logit(f, torch.rand(3, 3), k, 0.1, None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.gloro_fast.bottom_logit(f, d.double(), k, 0.1, None)
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        torch.ops.gloro_fast.bottom_logit(torch.randn(3, 1), torch.rand(1, 1), k, 0.1, None)
