"""Provable bounds against exact operator norms: upper ≥ exact ≥ lower on 520 random
layers (dense, convolutions with every padding form, strides 1–3, dilation, groups,
non-square inputs and kernels, LiResNet blocks, pooling), tiny and huge weights, float32
and float64. The exact norm is the largest singular value of the layer's explicit matrix
(built from torch's convolution on basis vectors, in float64)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import gloro_fast.nn as gnn
from gloro_fast.sound.conv import conv_circular_upper, conv_explicit_upper, conv_geometry
from gloro_fast.sound.dense import abs_norm_upper, spectral_norm_upper

pytestmark = pytest.mark.usefixtures("single_thread")

N_CASES = 520
# LAPACK's SVD is itself accurate to a few units of roundoff relative to ‖A‖
SVD_RTOL = 1e-12


def explicit(op, shape):
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = op(basis)
    return out.reshape(n, -1).t()


def svd_norm(matrix):
    return float(torch.linalg.svdvals(matrix)[0]) if matrix.numel() else 0.0


def random_case(index):
    """A reproducible random layer description."""
    rng = random.Random(1000 + index)
    dtype = rng.choice([torch.float32, torch.float64])
    huge = 1e30 if dtype == torch.float32 else 1e200
    scale = rng.choice([1.0, 1.0, 1.0, 1.0 / huge, huge, 1e-3, 1e3])
    kind = rng.choice(["linear", "conv", "conv", "conv", "conv", "liresblock", "avgpool"])
    case = dict(kind=kind, dtype=dtype, scale=scale, seed=index)
    if kind == "linear":
        case.update(in_features=rng.randint(1, 24), out_features=rng.randint(1, 24))
    elif kind == "avgpool":
        k = (rng.randint(1, 3), rng.randint(1, 3))
        case.update(kernel=k, shape=(rng.randint(1, 3), rng.randint(k[0], 8), rng.randint(k[1], 8)))
    elif kind == "liresblock":
        case.update(channels=rng.randint(1, 4), kernel=rng.choice([1, 2, 3, (3, 2), (2, 3)]),
                    dilation=rng.choice([1, 1, 2]), hw=(rng.randint(3, 7), rng.randint(3, 7)))
    else:
        groups = rng.choice([1, 1, 1, 2, 3])
        c_in = groups * rng.randint(1, 3)
        c_out = groups * rng.randint(1, 3)
        kernel = (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
        padding = rng.choice(["same", "valid", "int", "pair", "tuple4"])
        if padding == "int":
            padding = rng.randint(0, 2)
        elif padding == "pair":
            padding = (rng.randint(0, 2), rng.randint(0, 2))
        elif padding == "tuple4":
            padding = tuple(rng.randint(0, 3) for _ in range(4))
        eff = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        hw = (rng.randint(eff[0], eff[0] + 6), rng.randint(eff[1], eff[1] + 6))
        case.update(c_in=c_in, c_out=c_out, kernel=kernel, stride=stride, dilation=dilation,
                    padding=padding, groups=groups, hw=hw)
    return case


def build(case):
    torch.manual_seed(case["seed"])
    dt = case["dtype"]
    kind = case["kind"]
    if kind == "linear":
        layer = gnn.Linear(case["in_features"], case["out_features"], init="default", dtype=dt)
        shape = (case["in_features"],)
    elif kind == "avgpool":
        return gnn.AvgPool2d(case["kernel"]), case["shape"]
    elif kind == "liresblock":
        c = case["channels"]
        shape = (c,) + case["hw"]
        layer = gnn.LiResBlock(c, case["kernel"], dilation=case["dilation"], init="default", dtype=dt,
                               input_shape=shape)
    else:
        shape = (case["c_in"],) + case["hw"]
        layer = gnn.Conv2d(case["c_in"], case["c_out"], case["kernel"], stride=case["stride"],
                           padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                           init="default", dtype=dt, input_shape=shape)
    with torch.no_grad():
        layer.weight.mul_(case["scale"])
    return layer, shape


def layer_operator(layer):
    """The layer's linear part as a float64 function, built from torch's ops directly."""
    if isinstance(layer, gnn.AvgPool2d):
        return lambda x: F.avg_pool2d(x, layer.kernel_size)
    w = layer.weight.detach().to(torch.float64)
    if isinstance(layer, gnn.Linear):
        return lambda x: x @ w.t()
    pads = layer.pads_for(layer.input_shape[1:])

    def op(x):
        top, bottom, left, right = pads
        out = F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, layer.stride, 0, layer.dilation,
                       layer.groups)
        return out + x if isinstance(layer, gnn.LiResBlock) else out

    return op


@pytest.mark.parametrize("index", range(N_CASES))
def test_upper_exact_lower(index):
    case = random_case(index)
    layer, shape = build(case)
    matrix = explicit(layer_operator(layer), shape)
    exact = svd_norm(matrix)
    upper = layer.lipschitz_upper_bound()
    lower = layer.lipschitz_lower_bound()
    assert upper.dtype == torch.float64 and upper.dim() == 0
    assert lower.dtype == torch.float64 and lower.dim() == 0
    upper, lower = float(upper), float(lower)
    assert math.isfinite(upper), case
    assert upper >= exact * (1 - SVD_RTOL), (case, upper, exact)
    assert lower <= exact * (1 + SVD_RTOL), (case, lower, exact)
    if exact > 0:
        # small operators: the explicit Gram with the Cholesky certificate is ~exact, and
        # it is skipped only where the circular bound is within 2e-4 of a power iteration
        assert upper <= exact * (1 + 3e-4), (case, upper / exact)
    if isinstance(layer, gnn.PowerIterationModule) and 1e-3 <= case["scale"] <= 1e3:
        # a converged iterate gives a lower bound near the norm (power iteration squares the
        # scale of the weights: at 1e±30 in float32 or 1e±200 in float64 it over/underflows,
        # which only the estimate suffers from)
        result = layer.converge(tol=1e-12, max_iter=5000)
        assert float(result.lower) <= exact * (1 + SVD_RTOL)
        assert float(result.lower) >= exact * (1 - 1e-3) or exact == 0
        assert float(result.upper) == upper
    if isinstance(layer, (gnn.Linear, gnn.Conv2d)):
        # ‖|A|‖ (the forward-error analysis) is bounded too
        abs_exact = svd_norm(matrix.abs())
        alpha = abs_norm_upper(layer.weight) if isinstance(layer, gnn.Linear) else layer._abs_norm()
        assert alpha >= abs_exact * (1 - SVD_RTOL), (case, alpha, abs_exact)


CONV_CASES = [i for i in range(N_CASES)
              if random_case(i)["kind"] in ("conv", "liresblock") and 1e-3 <= random_case(i)["scale"] <= 1e3]


@pytest.mark.parametrize("index", CONV_CASES)
def test_circular_and_explicit_bounds_each_hold(index):
    """Both conv bounds are provable on their own (the layer takes the smaller); kernels of
    ordinary scale (conv_norm_upper scales by a power of two before calling them)."""
    case = random_case(index)
    layer, shape = build(case)
    exact = svd_norm(explicit(layer_operator(layer), shape))
    g = conv_geometry(layer.weight.shape, shape, layer.stride, layer.pads_for(shape[1:]), layer.dilation,
                      layer.groups, layer.residual)
    w = layer.weight.detach().double()
    circular = conv_circular_upper(w, g)
    explicit_bound = conv_explicit_upper(w, g)
    assert circular >= exact * (1 - SVD_RTOL)
    assert explicit_bound >= exact * (1 - SVD_RTOL)
    assert explicit_bound <= exact * (1 + 1e-5) or exact == 0


def test_case_mix():
    """The 520 cases cover what they claim to."""
    cases = [random_case(i) for i in range(N_CASES)]
    kinds = {c["kind"] for c in cases}
    assert kinds == {"linear", "conv", "liresblock", "avgpool"}
    convs = [c for c in cases if c["kind"] == "conv"]
    assert {s for c in convs for s in c["stride"]} == {1, 2, 3}
    assert {type(c["padding"]).__name__ for c in convs} == {"str", "int", "tuple"}
    assert {c["padding"] for c in convs if isinstance(c["padding"], str)} == {"same", "valid"}
    assert any(len(c["padding"]) == 4 for c in convs if isinstance(c["padding"], tuple))
    assert {c["groups"] for c in convs} >= {1, 2, 3}
    assert any(c["kernel"][0] != c["kernel"][1] for c in convs)
    assert any(c["hw"][0] != c["hw"][1] for c in convs)
    assert any(2 in c["dilation"] for c in convs)
    assert {c["dtype"] for c in cases} == {torch.float32, torch.float64}
    assert any(c["scale"] >= 1e30 for c in cases) and any(c["scale"] <= 1e-30 for c in cases)


@pytest.mark.parametrize("layer", [gnn.MinMax(), gnn.ReLU(), gnn.Flatten(), gnn.MaxPool2d(2)])
def test_exact_layers_bracket_is_one(layer):
    assert float(layer.lipschitz_upper_bound()) >= 1.0
    assert float(layer.lipschitz_lower_bound()) <= 1.0
    assert float(layer.lipschitz_upper_bound()) - 1.0 < 1e-15


def test_dense_extreme_shapes_and_values():
    assert spectral_norm_upper(torch.zeros(3, 4)) == 0.0
    assert spectral_norm_upper(torch.tensor([[math.nan]])) == math.inf
    assert spectral_norm_upper(torch.tensor([[math.inf, 0.0]])) == math.inf
    w = torch.diag(torch.tensor([100.0] + [1.0] * 15))
    assert 100.0 <= spectral_norm_upper(w) <= 100.0 * (1 + 1e-9)
    # subnormal float64 entries: the bound stays above the exact norm
    w = torch.full((3, 3), 1e-310, dtype=torch.float64)
    assert spectral_norm_upper(w) >= 3e-310
    with pytest.raises(ValueError, match="weight"):
        spectral_norm_upper(torch.zeros(3))
