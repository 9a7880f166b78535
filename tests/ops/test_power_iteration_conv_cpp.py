"""Compiled power_iteration_conv (C++ CPU: library convolutions + fused epilogues) against the
reference backend; power_iteration_conv_batched against per-layer calls; opcheck, dispatch."""
from __future__ import annotations

import random

import pytest
import torch

from gloro_fast.ops import power_iteration_conv
from gloro_fast.ops.convolution import normalize_padding
from gloro_fast.ops.power_iteration_conv import (
    power_iteration_conv_batched,
    power_iteration_conv_batched_reference,
)
from tests.helpers import OpLog
from tests.ops.cpp_helpers import POWER_ITERATION_TOL, cpp_op_marks, value_iterates_grads

pytestmark = cpp_op_marks("power_iteration_conv", single_thread=True)
TOL = POWER_ITERATION_TOL
OP = torch.ops.gloro_fast.power_iteration_conv
OP_BACKWARD = torch.ops.gloro_fast.power_iteration_conv_backward


# (c_in, c_out, groups, kernel, stride, padding, dilation, (H, W), residual)
CONFIGS = [
    (1, 1, 1, (1, 1), (1, 1), 0, (1, 1), (1, 1), False),
    (3, 8, 1, (3, 3), (1, 1), 1, (1, 1), (9, 9), False),
    (4, 4, 1, (3, 3), (1, 1), 1, (1, 1), (6, 7), True),  # LiResNet block
    (4, 4, 2, (3, 3), (1, 1), (2, 2), (2, 2), (5, 6), True),  # grouped, dilated residual
    (2, 6, 2, (4, 4), (2, 2), (1, 2, 1, 2), (1, 1), (8, 8), False),  # k4 s2 "same", asymmetric
    (3, 5, 1, (3, 2), (2, 3), (2, 0, 1, 3), (2, 2), (9, 10), False),
    (2, 4, 2, (2, 3), (3, 2), (0, 1), (2, 1), (7, 6), False),
    (1, 2, 1, (4, 4), (3, 3), 0, (1, 1), (4, 4), False),  # kernel = input
    (2, 2, 1, (1, 1), (1, 1), 2, (1, 1), (3, 4), False),  # padding wider than the kernel
    (3, 3, 3, (3, 3), (1, 1), 1, (1, 1), (5, 5), True),  # depthwise residual
    (1, 2, 1, (3, 3), (2, 2), (0, 3, 3, 0), (1, 1), (2, 2), False),  # padding-only windows
    (16, 32, 1, (4, 4), (4, 4), 0, (1, 1), (16, 16), False),  # LiResNet neck
]


def config_id(cfg):
    c_in, c_out, groups, k, s, p, d, hw, res = cfg
    return f"{c_in}-{c_out}g{groups}k{k[0]}{k[1]}s{s[0]}{s[1]}p{p}d{d[0]}{d[1]}hw{hw[0]}x{hw[1]}" + ("r" if res else "")


def make(cfg, gen, dtype, count=1):
    c_in, c_out, groups, k, s, p, d, hw, res = cfg
    weights, iterates = [], []
    for _ in range(count):
        w = torch.randn(c_out, c_in // groups, *k, generator=gen, dtype=torch.float64) * 0.3
        u = torch.randn(1, c_in, *hw, generator=gen, dtype=torch.float64)
        weights.append(w.to(dtype))
        iterates.append((u / torch.linalg.vector_norm(u)).to(dtype))
    kwargs = dict(stride=s, padding=p, dilation=d, groups=groups, residual=res)
    return weights, iterates, kwargs


def run_one(weight, iterate, n_iter, grad, kwargs):
    w = weight.detach().clone().requires_grad_(True)
    u, sigma = power_iteration_conv(w, iterate, n_iter, **kwargs)
    sigma.backward(grad)
    return u.detach(), sigma.detach(), w.grad


def run_batched(weights, iterates, n_iter, grads, kwargs):
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    us, sigmas = power_iteration_conv_batched(ws, iterates, n_iter, **kwargs)
    if grads is None:
        torch.stack(sigmas).sum().backward()  # expanded stride-0 gradient
    else:
        torch.autograd.backward(sigmas, grads)
    return [u.detach() for u in us], [s.detach() for s in sigmas], [w.grad for w in ws]


def assert_close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n_iter", [0, 1, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_matches_reference(cfg, n_iter, dtype, gen, backend):
    (w,), (u,), kwargs = make(cfg, gen, dtype)
    grad = torch.randn((), generator=gen, dtype=torch.float64).to(dtype)
    ref = backend("reference", run_one, w, u, n_iter, grad, kwargs)
    out = backend("cpp", run_one, w, u, n_iter, grad, kwargs)
    for got, want in zip(out, ref):
        assert_close(got, want, dtype)
    assert out[1].shape == ()


def random_configs(count=16, seed=11):
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rng.choice([1, 2])
        c_in, c_out = groups * rng.choice([1, 2, 3]), groups * rng.choice([1, 2, 3])
        k = (rng.randint(1, 4), rng.randint(1, 4))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        d = (rng.randint(1, 2), rng.randint(1, 2))
        p = tuple(rng.randint(0, 3) for _ in range(4))
        hw = (rng.randint(1, 9), rng.randint(1, 9))
        if any(hw[a] + p[2 * a] + p[2 * a + 1] < d[a] * (k[a] - 1) + 1 for a in range(2)):
            continue
        configs.append((c_in, c_out, groups, k, s, p, d, hw, False))
    return configs


@pytest.mark.parametrize("cfg", random_configs(), ids=config_id)
def test_random_configs_f64(cfg, gen, backend):
    (w,), (u,), kwargs = make(cfg, gen, torch.float64)
    grad = torch.tensor(1.7, dtype=torch.float64)
    ref = backend("reference", run_one, w, u, 3, grad, kwargs)
    out = backend("cpp", run_one, w, u, 3, grad, kwargs)
    for got, want in zip(out, ref):
        assert_close(got, want, torch.float64)


def test_non_contiguous_inputs(gen, backend):
    cfg = (4, 6, 2, (3, 3), (2, 1), (1, 0, 2, 1), (1, 1), (7, 8), False)
    (w,), (u,), kwargs = make(cfg, gen, torch.float64)
    w_nc = w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)  # same values, other strides
    u_nc = u.to(memory_format=torch.channels_last)
    assert not w_nc.is_contiguous() and not u_nc.is_contiguous()
    grad = torch.tensor(0.8, dtype=torch.float64)
    ref = backend("reference", run_one, w, u, 3, grad, kwargs)
    out = backend("cpp", run_one, w_nc, u_nc, 3, grad, kwargs)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_zero_kernel_keeps_iterate(gen, backend):
    cfg = (2, 3, 1, (3, 3), (1, 1), 1, (1, 1), (5, 5), False)
    (w,), (u,), kwargs = make(cfg, gen, torch.float64)
    w = torch.zeros_like(w)
    new_u, sigma, grad = backend("cpp", run_one, w, u, 3, torch.tensor(1.0, dtype=torch.float64), kwargs)
    torch.testing.assert_close(new_u, u, rtol=0, atol=0)
    assert float(sigma) == 0.0 and torch.equal(grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_reduced_precision(dtype, gen, backend):
    cfg = (4, 4, 1, (3, 3), (1, 1), 1, (1, 1), (6, 6), True)
    (w,), (u,), kwargs = make(cfg, gen, torch.float64)
    ref = backend("reference", run_one, w, u, 2, torch.tensor(1.0, dtype=torch.float64), kwargs)
    out = backend("cpp", run_one, w.to(dtype), u.to(dtype), 2, torch.tensor(1.0, dtype=dtype), kwargs)
    for got, want in zip(out, ref):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)


# ---- batching of equal-configuration layers ----------------------------------------------

BATCH_CONFIGS = [CONFIGS[2], CONFIGS[3], CONFIGS[4], CONFIGS[5], CONFIGS[9], CONFIGS[10]]


@pytest.mark.parametrize("name", ["reference", "cpp"])
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("cfg", BATCH_CONFIGS, ids=config_id)
def test_batched_matches_per_layer(cfg, count, name, gen, backend):
    weights, iterates, kwargs = make(cfg, gen, torch.float64, count)
    weights[0] = weights[0] * 3  # layers of very different norms: normalisation is per layer
    grads = [torch.randn((), generator=gen, dtype=torch.float64) for _ in range(count)]
    us, sigmas, gws = backend(name, run_batched, weights, iterates, 3, grads, kwargs)
    for k in range(count):
        want = backend("reference", run_one, weights[k], iterates[k], 3, grads[k], kwargs)
        for got, ref in zip((us[k], sigmas[k], gws[k]), want):
            assert_close(got, ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_batched_cpp_matches_batched_reference(dtype, gen, backend):
    cfg = (8, 8, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), True)  # LiResNet blocks
    weights, iterates, kwargs = make(cfg, gen, dtype, 6)
    ref = backend("reference", run_batched, weights, iterates, 2, None, kwargs)
    out = backend("cpp", run_batched, weights, iterates, 2, None, kwargs)
    for got, want in zip(out, ref):
        for a, b in zip(got, want):
            assert_close(a, b, dtype)


def test_batched_reference_function(gen):
    cfg = CONFIGS[4]
    weights, iterates, kwargs = make(cfg, gen, torch.float64, 3)
    args = (kwargs["stride"], normalize_padding(kwargs["padding"]), kwargs["dilation"], kwargs["groups"],
            kwargs["residual"])
    u, sigma = power_iteration_conv_batched_reference(torch.cat(weights), torch.cat(iterates), 2, *args)
    assert u.shape == (3,) + iterates[0].shape[1:] and sigma.shape == (3,)
    for k in range(3):
        u_k, s_k = power_iteration_conv(weights[k], iterates[k], 2, **kwargs)
        torch.testing.assert_close(u[k : k + 1], u_k, **TOL[torch.float64])
        torch.testing.assert_close(sigma[k], s_k, **TOL[torch.float64])


def test_batched_validation(gen):
    weights, iterates, kwargs = make(CONFIGS[1], gen, torch.float64, 2)
    assert power_iteration_conv_batched([], [], 1, **kwargs) == ([], [])
    with pytest.raises(ValueError, match="same length"):
        power_iteration_conv_batched(weights, iterates[:1], 1, **kwargs)
    with pytest.raises(ValueError, match=r"weights\[1\] must match"):
        power_iteration_conv_batched([weights[0], weights[1][:2]], iterates, 1, **kwargs)
    with pytest.raises(ValueError, match=r"iterates\[1\] must match"):
        power_iteration_conv_batched(weights, [iterates[0], iterates[1][..., :-1]], 1, **kwargs)


def test_liresnet_blocks_batched(gen, backend):
    """The blocks of a LiResNet have one configuration: batched == per-layer bounds."""
    from gloro_fast.models import liresnet

    model = liresnet(input_shape=(3, 8, 8), depth=3, width=4).double()
    blocks = [m for m in model.modules() if type(m).__name__ == "LiResBlock"]
    assert len(blocks) == 3
    kwargs = dict(stride=blocks[0].stride, padding=blocks[0].pads_for((8, 8)), dilation=blocks[0].dilation,
                  groups=1, residual=True)
    weights = [b.weight for b in blocks]
    iterates = [b.power_iterate for b in blocks]
    us, sigmas = backend("cpp", power_iteration_conv_batched, weights, iterates, 2, **kwargs)
    for k, block in enumerate(blocks):
        u_k, s_k = backend("reference", power_iteration_conv, block.weight, block.power_iterate, 2, **kwargs)
        torch.testing.assert_close(us[k], u_k, **TOL[torch.float64])
        torch.testing.assert_close(sigmas[k], s_k, **TOL[torch.float64])


# ---- opcheck, dispatch, compile ----------------------------------------------------------


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[4], CONFIGS[5]], ids=config_id)
@pytest.mark.parametrize("count", [1, 3])
def test_opcheck(cfg, count, gen):
    weights, iterates, kwargs = make(cfg, gen, torch.float64, count)
    w, u = torch.cat(weights).requires_grad_(True), torch.cat(iterates)
    args = (list(kwargs["stride"]), list(normalize_padding(kwargs["padding"])), list(kwargs["dilation"]),
            kwargs["groups"], kwargs["residual"])
    for n_iter in (0, 2):
        torch.library.opcheck(OP, (w, u, n_iter, *args))
    new_u, sigma, image = OP(w.detach(), u, 1, *args)
    grad = torch.randn(count, generator=gen, dtype=torch.float64)
    torch.library.opcheck(OP_BACKWARD, (grad, w.detach(), new_u, sigma, image, *args))


def test_compiled_op_is_dispatched(gen, backend):
    (w,), (u,), kwargs = make(CONFIGS[4], gen, torch.float64)
    grad = torch.tensor(1.0, dtype=torch.float64)

    def logged(name, fn, *args):
        with OpLog() as log:
            backend(name, fn, *args)
        return log.names

    names = logged("cpp", run_one, w, u, 2, grad, kwargs)
    assert "gloro_fast.power_iteration_conv.default" in names
    assert "gloro_fast.power_iteration_conv_backward.default" in names
    assert not any(n.startswith("gloro_fast.") for n in logged("reference", run_one, w, u, 2, grad, kwargs))
    # auto on CPU: the compiled op without a graph; a graph-building call runs the reference
    # (torch's autograd of it is faster there: gloro_fast.ops._power_iteration_common.runs_reference)
    assert not any(n.startswith("gloro_fast.") for n in logged("auto", run_one, w, u, 2, grad, kwargs))

    def no_graph(weight, iterate):
        with torch.no_grad():
            return power_iteration_conv(weight, iterate, 2, **kwargs)

    assert "gloro_fast.power_iteration_conv.default" in logged("auto", no_graph, w, u)
    batched = logged("cpp", run_batched, [w, w], [u, u], 2, None, kwargs)
    assert batched.count("gloro_fast.power_iteration_conv.default") == 1  # one call for both layers


def test_layers_use_compiled_op(backend):
    from gloro_fast import nn as gnn

    layer = gnn.Conv2d(2, 4, 3, padding="same", input_shape=(2, 6, 6)).double()
    with OpLog() as log:
        backend("cpp", layer.lipschitz_bound, 2)
    assert "gloro_fast.power_iteration_conv.default" in log.names


def test_torch_compile(gen, backend):
    weights, iterates, kwargs = make(CONFIGS[3], gen, torch.float64, 2)

    def step(ws, us):
        u0, s0 = power_iteration_conv(ws[0], us[0], 2, **kwargs)
        new_us, sigmas = power_iteration_conv_batched(ws, us, 1, **kwargs)
        return s0 * torch.stack(sigmas).sum(), new_us

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = backend("cpp", value_iterates_grads, compiled, weights, iterates)
    want = backend("reference", value_iterates_grads, step, weights, iterates)
    for a, b in zip([got[0]] + got[1] + got[2], [want[0]] + want[1] + want[2]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[4]], ids=config_id)
def test_gradcheck_and_double_backward(cfg, gen, backend):
    (w,), (u,), kwargs = make(cfg, gen, torch.float64)
    w.requires_grad_(True)
    u = backend("cpp", power_iteration_conv, w.detach(), u, 2, **kwargs)[0]

    def fn(weight):
        return power_iteration_conv(weight, u, 0, **kwargs)[1]

    assert backend("cpp", torch.autograd.gradcheck, fn, (w,), eps=1e-6, atol=1e-8)
    assert backend("cpp", torch.autograd.gradgradcheck, fn, (w,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[4], CONFIGS[5]], ids=config_id)
def test_image_is_the_operator_applied_to_u(cfg, gen, backend):
    """The op's third output, y_l = A_l u_l (+ u_l for a residual block), against the
    reference operator in float64; its norm is σ̂_l."""
    from gloro_fast.ops.convolution import conv_operator

    weights, iterates, kwargs = make(cfg, gen, torch.float64, 2)
    w, u = torch.cat(weights), torch.cat(iterates)
    pads = normalize_padding(kwargs["padding"])
    args = (list(kwargs["stride"]), list(pads), list(kwargs["dilation"]), kwargs["groups"], kwargs["residual"])
    new_u, sigma, image = backend("cpp", OP, w, u, 1, *args)
    for k in range(2):
        want = conv_operator(new_u[k : k + 1], weights[k], tuple(kwargs["stride"]), pads, tuple(kwargs["dilation"]),
                             kwargs["groups"], residual=kwargs["residual"])
        torch.testing.assert_close(image[k : k + 1], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.linalg.vector_norm(image[k]), sigma[k], rtol=1e-12, atol=1e-12)


def test_backward_rejects_an_image_that_is_not_the_forwards(gen, backend):
    """The backward kernel uses the image instead of recomputing it: a wrong shape or dtype
    is refused with a message naming it."""
    (w,), (u,), kwargs = make(CONFIGS[1], gen, torch.float32)
    args = (list(kwargs["stride"]), list(normalize_padding(kwargs["padding"])), list(kwargs["dilation"]),
            kwargs["groups"], kwargs["residual"])
    new_u, sigma, image = backend("cpp", OP, w, u, 1, *args)
    kernel = torch.ops._gloro_fast_cpp.power_iteration_conv_backward
    for bad in (image[:, :3], image.double(), image.flatten(1)):
        with pytest.raises(RuntimeError, match="image"):
            kernel(torch.ones(1), w, new_u, sigma, bad, *args)
