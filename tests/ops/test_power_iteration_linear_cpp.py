"""Compiled power_iteration_linear (C++ CPU kernels) against the reference backend, opcheck, dispatch."""
from __future__ import annotations

import pytest
import torch

from gloro_fast.ops import power_iteration_linear
from tests.helpers import OpLog
from tests.ops.cpp_helpers import POWER_ITERATION_TOL, cpp_op_marks, value_iterates_grads

pytestmark = cpp_op_marks("power_iteration_linear", single_thread=True)
TOL = POWER_ITERATION_TOL
OP = torch.ops.gloro_fast.power_iteration_linear
OP_BACKWARD = torch.ops.gloro_fast.power_iteration_linear_backward


def unit(n, gen, dtype):
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    return (u / torch.linalg.vector_norm(u)).to(dtype)


def layers(shapes, gen, dtype):
    weights = [torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype) for m, n in shapes]
    return weights, [unit(n, gen, dtype) for _, n in shapes]


def run_layers(weights, iterates, n_iter, grads=None):
    """New iterates, sigmas and dL/dW_l for L = Σ g_l σ_l (grads=None: L = Σ σ_l, whose
    gradient reaches each σ_l through an expanded stride-0 tensor)."""
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    us, sigmas = power_iteration_linear(ws, iterates, n_iter)
    if grads is None:
        torch.stack(sigmas).sum().backward()
    else:
        torch.autograd.backward(sigmas, grads)
    return [u.detach() for u in us], [s.detach() for s in sigmas], [w.grad for w in ws]


def assert_close_lists(got, want, dtype):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


SHAPE_SETS = [
    [(1, 1)],
    [(1, 17)],
    [(23, 1)],
    [(7, 5), (5, 7)],
    [(1, 9), (9, 1), (30, 50), (64, 64), (3, 200)],
    [(128, 300), (10, 128), (512, 4)],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n_iter", [0, 1, 5])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=lambda s: "+".join(f"{m}x{n}" for m, n in s))
def test_matches_reference(shapes, n_iter, dtype, gen, backend):
    weights, iterates = layers(shapes, gen, dtype)
    grads = [torch.randn((), generator=gen, dtype=torch.float64).to(dtype) for _ in shapes]
    ref = backend("reference", run_layers, weights, iterates, n_iter, grads)
    out = backend("cpp", run_layers, weights, iterates, n_iter, grads)
    for got, want in zip(out, ref):
        assert_close_lists(got, want, dtype)
    for u in out[0]:  # unit iterates
        torch.testing.assert_close(torch.linalg.vector_norm(u), torch.ones((), dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_random_shapes_expanded_grad(dtype, gen, backend):
    sizes = torch.randint(1, 70, (12, 2), generator=gen).tolist()
    weights, iterates = layers(sizes, gen, dtype)
    ref = backend("reference", run_layers, weights, iterates, 3)
    out = backend("cpp", run_layers, weights, iterates, 3)
    for got, want in zip(out, ref):
        assert_close_lists(got, want, dtype)


def test_non_contiguous_inputs(gen, backend):
    base = torch.randn(40, 60, generator=gen, dtype=torch.float64)
    weights = [base.t(), base[::2, ::3], base.t()[5:20:2, 1:30:4]]
    assert not any(w.is_contiguous() for w in weights)
    vec = torch.randn(2 * 60, generator=gen, dtype=torch.float64)
    iterates = []
    for w in weights:
        u = vec[: 2 * w.shape[1] : 2]  # strided iterate
        iterates.append(u / torch.linalg.vector_norm(u))
    ref = backend("reference", run_layers, weights, iterates, 4)
    out = backend("cpp", run_layers, weights, iterates, 4)
    for got, want in zip(out, ref):
        assert_close_lists(got, want, torch.float64)


def test_single_layer_api(gen, backend):
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    u = unit(4, gen, torch.float64)
    new_u, sigma = backend("cpp", power_iteration_linear, w, u, 2)
    assert new_u.shape == (4,) and not new_u.requires_grad
    assert sigma.shape == () and sigma.requires_grad
    ref_u, ref_sigma = backend("reference", power_iteration_linear, w, u, 2)
    torch.testing.assert_close(new_u, ref_u, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sigma, ref_sigma, rtol=1e-12, atol=0)
    # the input iterate is not modified and never aliased
    out_u, _ = backend("cpp", power_iteration_linear, w, u, 0)
    assert out_u.data_ptr() != u.data_ptr()
    torch.testing.assert_close(out_u, u, rtol=0, atol=0)


def test_zero_layer_keeps_iterate_and_zero_grad(gen, backend):
    weights = [torch.zeros(5, 3, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)]
    iterates = [unit(3, gen, torch.float64), unit(3, gen, torch.float64)]
    us, sigmas, grads = backend("cpp", run_layers, weights, iterates, 3)
    torch.testing.assert_close(us[0], iterates[0], rtol=0, atol=0)
    assert float(sigmas[0]) == 0.0
    assert torch.equal(grads[0], torch.zeros(5, 3, dtype=torch.float64))
    ref = backend("reference", run_layers, weights, iterates, 3)
    assert_close_lists(us, ref[0], torch.float64)
    assert_close_lists(grads, ref[2], torch.float64)


def test_mixed_dtypes_in_one_call(gen, backend):
    w64, u64 = layers([(9, 7), (3, 11)], gen, torch.float64)
    w32, u32 = layers([(5, 6)], gen, torch.float32)
    weights, iterates = [w64[0], w32[0], w64[1]], [u64[0], u32[0], u64[1]]
    us, sigmas, grads = backend("cpp", run_layers, weights, iterates, 2)
    ref = backend("reference", run_layers, weights, iterates, 2)
    for k, dtype in enumerate([torch.float64, torch.float32, torch.float64]):
        for got, want in zip((us[k], sigmas[k], grads[k]), (ref[0][k], ref[1][k], ref[2][k])):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_reduced_precision(dtype, gen, backend):
    weights, iterates = layers([(16, 8), (8, 33)], gen, torch.float64)
    ref = backend("reference", run_layers, weights, iterates, 3)
    low_w, low_u = [w.to(dtype) for w in weights], [u.to(dtype) for u in iterates]
    out = backend("cpp", run_layers, low_w, low_u, 3)
    for got, want in zip(out, ref):
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)


def test_empty_list(backend):
    assert backend("cpp", power_iteration_linear, [], [], 3) == ([], [])


def test_opcheck(gen):
    for shapes in ([(1, 1)], [(1, 9), (9, 1), (12, 7)]):
        for dtype in (torch.float32, torch.float64):
            weights, iterates = layers(shapes, gen, dtype)
            for n_iter in (0, 2):
                torch.library.opcheck(OP, ([w.requires_grad_(True) for w in weights], iterates, n_iter))
            _, sigmas, images = OP([w.detach() for w in weights], iterates, 1)
            grads = [torch.randn((), generator=gen, dtype=torch.float64).to(dtype) for _ in shapes]
            torch.library.opcheck(OP_BACKWARD, (grads, [w.detach() for w in weights], iterates, sigmas, images))


def test_compiled_op_is_dispatched(gen, backend):
    weights, iterates = layers([(6, 4), (3, 5)], gen, torch.float64)

    def logged(name, fn=run_layers):
        with OpLog() as log:
            backend(name, fn, weights, iterates, 2)
        return log.names

    def no_graph(ws, us, n_iter):
        with torch.no_grad():
            return power_iteration_linear(ws, us, n_iter)

    names = logged("cpp")
    assert "gloro_fast.power_iteration_linear.default" in names
    assert "gloro_fast.power_iteration_linear_backward.default" in names
    assert not any(n.startswith("gloro_fast.") for n in logged("reference"))
    # auto on CPU: the compiled op without a graph; a graph-building call runs the reference
    # (torch's autograd of it is faster there: gloro_fast.ops._power_iteration_common.runs_reference)
    assert "gloro_fast.power_iteration_linear.default" in logged("auto", no_graph)
    assert not any(n.startswith("gloro_fast.") for n in logged("auto"))


def test_layers_and_model_use_compiled_op(gen, backend):
    from gloro_fast import nn as gnn

    layer = gnn.Linear(7, 5).double()
    with OpLog() as log:
        backend("cpp", layer.lipschitz_bound, 2)
    assert "gloro_fast.power_iteration_linear.default" in log.names


def test_torch_compile(gen, backend):
    weights, iterates = layers([(6, 4), (3, 5)], gen, torch.float64)

    def step(ws, us):
        new_us, sigmas = power_iteration_linear(ws, us, 2)
        return torch.stack(sigmas).prod(), new_us

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = backend("cpp", value_iterates_grads, compiled, weights, iterates)
    want = backend("reference", value_iterates_grads, step, weights, iterates)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=0)
    assert_close_lists(got[1], want[1], torch.float64)
    assert_close_lists(got[2], want[2], torch.float64)


@pytest.mark.parametrize("shape", [(1, 3), (3, 1), (4, 6)])
def test_gradcheck_and_double_backward(shape, gen, backend):
    w = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    u = backend("cpp", power_iteration_linear, w.detach(), unit(shape[1], gen, torch.float64), 2)[0]

    def fn(weight):
        return power_iteration_linear([weight], [u], 0)[1][0]

    assert backend("cpp", torch.autograd.gradcheck, fn, (w,), eps=1e-6, atol=1e-8)
    assert backend("cpp", torch.autograd.gradgradcheck, fn, (w,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_images_are_w_u_in_the_accumulation_dtype(gen, dtype, backend):
    """The op's third output, y_l = W_l u_l (what its backward uses instead of reading W),
    against a float64 product; float64 for float64 weights, float32 otherwise."""
    weights, iterates = layers([(6, 4), (3, 5), (1, 9)], gen, dtype)
    us, sigmas, images = backend("cpp", OP, weights, iterates, 2)
    for w, u, s, y in zip(weights, us, sigmas, images):
        assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and y.shape == (w.shape[0],)
        want = w.double() @ u.double()
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y.double(), want, **tol)
        torch.testing.assert_close(torch.linalg.vector_norm(y).to(s.dtype), s, **tol)


def test_backward_rejects_an_image_that_is_not_the_forwards(gen, backend):
    """The backward kernel reads the image instead of W: a wrong length or dtype is refused
    with a message naming it, before any memory is read."""
    weights, iterates = layers([(6, 4)], gen, torch.float32)
    us, sigmas, images = backend("cpp", OP, weights, iterates, 1)
    grads = [torch.ones(())]
    kernel = torch.ops._gloro_fast_cpp.power_iteration_linear_backward
    for bad in ([images[0][:5]], [images[0].double()], []):
        with pytest.raises(RuntimeError, match="images"):
            kernel(grads, weights, us, sigmas, bad)
