"""gloro_fast.nn layers: Lipschitz bounds against exact operator norms, forward passes
against torch, geometry, state, conversion and rejection of unsupported layers."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gloro_fast.nn as gnn
from tests.helpers import explicit_matrix, planted_matrix

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def exact_norm(matrix):
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def conv_matrix(weight, in_shape, stride, pads, dilation=(1, 1), groups=1):
    """Explicit matrix of the zero-padded convolution, built with F.pad + F.conv2d."""
    top, bottom, left, right = pads
    w = weight.detach()
    return explicit_matrix(
        lambda x: F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, stride, 0, dilation, groups), in_shape
    )


def planted(m, n, gen, top=2.0, rest=1.0):
    return planted_matrix(m, n, gen, top, rest)


def converged(layer):
    result = layer.converge(tol=1e-13, max_iter=20000)
    assert result.status in ("closed", "stalled"), (
        f"{type(layer).__name__} did not converge in {result.iterations} iterations")
    # the bracket holds the estimate: lower ≤ σ̂ ≤ upper
    assert float(result.lower) <= float(result.estimate) * (1 + 1e-12)
    assert float(result.estimate) <= float(result.upper)
    return float(result.estimate)


# -- Linear ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (7, 4), (4, 9)])
def test_linear_bound_is_spectral_norm(shape, gen):
    out_f, in_f = shape
    layer = gnn.Linear(in_f, out_f, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(planted(out_f, in_f, gen))
    exact = exact_norm(layer.weight.detach())
    assert abs(exact - 2.0) < 1e-12
    before = float(layer.lipschitz_bound(0).detach())
    assert before <= exact * (1 + 1e-12)
    assert abs(converged(layer) - exact) <= 1e-5 * exact
    # the iterate buffer holds the converged vector: an estimate without iterating agrees
    assert abs(float(layer.lipschitz_estimate().detach()) - exact) <= 1e-5 * exact


def test_linear_bound_updates_buffer_only_when_iterating(gen):
    layer = gnn.Linear(6, 4, dtype=F64, init="default")
    u0 = layer.power_iterate.clone()
    s0 = layer.lipschitz_bound(0).detach()
    assert torch.equal(layer.power_iterate, u0)
    assert abs(float(s0) - float(torch.linalg.vector_norm(layer.weight.detach() @ u0))) < 1e-14
    layer.lipschitz_bound(2)
    assert not torch.equal(layer.power_iterate, u0)
    w = layer.weight.detach()
    expect = u0
    for _ in range(2):
        expect = w.t() @ (w @ expect)
        expect = expect / expect.norm()
    torch.testing.assert_close(layer.power_iterate, expect, rtol=1e-12, atol=1e-14)


def test_linear_bound_gradient(gen):
    layer = gnn.Linear(5, 3, dtype=F64, init="default")
    sigma = layer.lipschitz_bound(1)
    sigma.backward()
    u = layer.power_iterate
    w = layer.weight.detach()
    expect = torch.outer(w @ u, u) / torch.linalg.vector_norm(w @ u)
    torch.testing.assert_close(layer.weight.grad, expect, rtol=1e-12, atol=1e-14)
    assert layer.bias.grad is None


def test_linear_forward_is_torch_linear(gen):
    layer = gnn.Linear(5, 3, dtype=F64)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(3, generator=gen, dtype=F64))
    x = torch.randn(2, 4, 5, generator=gen, dtype=F64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias, rtol=1e-14, atol=1e-14)


# -- orthogonal init --------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, rows, cols",
    [
        (lambda: gnn.Linear(7, 3, dtype=F64), 3, 7),  # wide: W Wᵀ = I
        (lambda: gnn.Linear(3, 7, dtype=F64), 7, 3),  # tall: Wᵀ W = I
        (lambda: gnn.Conv2d(2, 4, 3, dtype=F64), 4, 18),
        (lambda: gnn.Conv2d(8, 20, 1, dtype=F64), 20, 8),
        (lambda: gnn.LiResBlock(3, dtype=F64), 3, 27),
    ],
)
def test_orthogonal_init(make, rows, cols):
    layer = make()
    w = layer.weight.detach().reshape(rows, cols)
    if rows <= cols:
        torch.testing.assert_close(w @ w.t(), torch.eye(rows, dtype=F64), rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(w.t() @ w, torch.eye(cols, dtype=F64), rtol=0, atol=1e-12)
    assert layer.bias is None or torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_default_init_is_not_orthogonal():
    torch.manual_seed(0)
    w = gnn.Linear(7, 3, dtype=F64, init="default").weight.detach()
    assert not torch.allclose(w @ w.t(), torch.eye(3, dtype=F64), atol=1e-3)
    with pytest.raises(ValueError, match="init"):
        gnn.Linear(3, 3, init="xavier")
    with pytest.raises(ValueError, match="init"):
        gnn.Conv2d(3, 3, 3, init="xavier")


# -- Conv2d -------------------------------------------------------------------------------

CONV_BOUND_CASES = [
    # (c_in, c_out, k, stride, padding, dilation, groups, (H, W), pads)
    (2, 3, 3, 1, 1, 1, 1, (6, 5), (1, 1, 1, 1)),
    (2, 3, 4, 2, "same", 1, 1, (8, 8), (1, 1, 1, 1)),
    (1, 2, 3, 2, "same", 1, 1, (8, 7), (0, 1, 1, 1)),
    (2, 2, 2, 1, "same", 1, 1, (5, 6), (0, 1, 0, 1)),
    (2, 4, 3, 2, (1, 0, 2, 1), (1, 2), 2, (7, 6), (1, 0, 2, 1)),
    (3, 2, 3, 1, "valid", 1, 1, (5, 5), (0, 0, 0, 0)),
    (2, 2, 3, (2, 1), (0, 2), 2, 1, (6, 5), (0, 0, 2, 2)),
]


@pytest.mark.parametrize("case", CONV_BOUND_CASES)
def test_conv_bound_is_operator_norm(case, gen):
    c_in, c_out, k, stride, padding, dilation, groups, hw, pads = case
    layer = gnn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       dtype=F64, input_shape=(c_in, *hw))
    assert layer.pads_for(hw) == pads
    with torch.no_grad():  # a random (non-orthogonal) kernel, with its groups' norms apart
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=F64))
        layer.weight[: c_out // groups] *= 1.5
    a = conv_matrix(layer.weight, (c_in, *hw), layer.stride, pads, layer.dilation, groups)
    exact = exact_norm(a)
    assert float(layer.lipschitz_bound(0).detach()) <= exact * (1 + 1e-12)
    assert abs(converged(layer) - exact) <= 1e-5 * exact
    # the forward pass is the same operator (plus bias)
    x = torch.randn(3, c_in, *hw, generator=gen, dtype=F64)
    y = layer(x) - layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y.reshape(3, -1), x.reshape(3, -1) @ a.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "hw, k, s, out, pads",
    [
        # hand-computed TensorFlow "same" sizes/pads: out = ceil(H/s), odd pixel bottom/right
        (28, 4, 2, 14, (1, 1)),
        (28, 3, 2, 14, (0, 1)),
        (28, 5, 2, 14, (1, 2)),
        (27, 3, 2, 14, (1, 1)),
        (14, 4, 2, 7, (1, 1)),
        (32, 4, 2, 16, (1, 1)),
        (7, 4, 2, 4, (1, 2)),
        (8, 2, 1, 8, (0, 1)),
        (9, 3, 1, 9, (1, 1)),
        (5, 1, 3, 2, (0, 0)),
        (28, 4, 4, 7, (0, 0)),
        (10, 3, 3, 4, (1, 1)),
    ],
)
def test_same_padding_matches_tensorflow(hw, k, s, out, pads, gen):
    layer = gnn.Conv2d(1, 2, k, stride=s, padding="same", dtype=F64)
    x = torch.randn(2, 1, hw, hw + 1, generator=gen, dtype=F64)
    y = layer(x)
    out_w = math.ceil((hw + 1) / s)
    assert y.shape == (2, 2, out, out_w)
    top, bottom = pads
    left, right = layer.pads_for((hw, hw + 1))[2:]
    assert layer.pads_for((hw, hw + 1))[:2] == (top, bottom)
    assert left + right == max((out_w - 1) * s + k - (hw + 1), 0) and right - left in (0, 1)
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), layer.weight, layer.bias, s)
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)


def test_same_stride2_on_28x28_gives_14x14():
    layer = gnn.Conv2d(1, 16, 4, stride=2, padding="same")
    assert layer(torch.randn(2, 1, 28, 28)).shape == (2, 16, 14, 14)
    layer2 = gnn.Conv2d(16, 32, 4, stride=2, padding="same")
    assert layer2(torch.randn(2, 16, 14, 14)).shape == (2, 32, 7, 7)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("k, dilation", [(3, 1), (4, 1), (2, 2), (2, 1), (5, 2)])
def test_same_stride1_matches_torch_same(k, dilation, gen):
    layer = gnn.Conv2d(2, 3, k, padding="same", dilation=dilation, dtype=F64)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(3, generator=gen, dtype=F64))
    x = torch.randn(2, 2, 7, 6, generator=gen, dtype=F64)
    ref = F.conv2d(x, layer.weight, layer.bias, padding="same", dilation=dilation)
    torch.testing.assert_close(layer(x), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 3), padding=(2, 1), dilation=(1, 2)),
        dict(kernel_size=4, stride=3, padding=0, groups=2),
        dict(kernel_size=1, padding=0),
        dict(kernel_size=3, padding="valid"),
    ],
)
def test_conv_forward_matches_torch_symmetric(kw, gen):
    layer = gnn.Conv2d(4, 6, dtype=F64, **kw)
    ref_layer = nn.Conv2d(4, 6, dtype=F64, **kw)
    with torch.no_grad():
        ref_layer.weight.copy_(torch.randn(ref_layer.weight.shape, generator=gen, dtype=F64))
        ref_layer.bias.copy_(torch.randn(6, generator=gen, dtype=F64))
        layer.weight.copy_(ref_layer.weight)
        layer.bias.copy_(ref_layer.bias)
    x = torch.randn(2, 4, 9, 8, generator=gen, dtype=F64)
    torch.testing.assert_close(layer(x), ref_layer(x), rtol=1e-13, atol=1e-13)


def test_conv_explicit_four_tuple_padding(gen):
    layer = gnn.Conv2d(2, 2, 3, stride=2, padding=(0, 2, 1, 0), dtype=F64)
    assert layer.pads_for((6, 6)) == (0, 2, 1, 0)
    x = torch.randn(1, 2, 6, 6, generator=gen, dtype=F64)
    ref = F.conv2d(F.pad(x, (1, 0, 0, 2)), layer.weight, layer.bias, 2)
    torch.testing.assert_close(layer(x), ref, rtol=1e-13, atol=1e-13)


def test_conv_rejects_another_input_size(gen):
    layer = gnn.Conv2d(2, 3, 3, padding=1)
    with pytest.raises(RuntimeError, match="input"):
        layer.lipschitz_bound()
    layer(torch.randn(1, 2, 8, 8))
    assert layer.input_shape == (2, 8, 8)
    layer(torch.randn(4, 2, 8, 8))  # another batch size is fine
    with pytest.raises(ValueError, match="8, 8"):
        layer(torch.randn(1, 2, 9, 8))
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(2, 8, 8))
    bound = gnn.Conv2d(2, 3, 3, padding=1, input_shape=(2, 5, 5))
    with pytest.raises(ValueError):
        bound(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        gnn.Conv2d(2, 3, 3, input_shape=(3, 5, 5))


def test_conv_follows_settings_edited_after_a_forward(gen):
    """The forward's memoised paddings are keyed by the settings' values: a padding or a
    stride edited after a forward is the one the next forward uses (torch.nn.Conv2d's
    semantics), for "same", "valid" and explicit paddings."""
    x = torch.randn(2, 2, 9, 9, generator=gen, dtype=F64)
    layer = gnn.Conv2d(2, 3, 3, padding="same", dtype=F64)
    w, b = layer.weight, layer.bias
    torch.testing.assert_close(layer(x), F.conv2d(x, w, b, padding=1), rtol=0, atol=0)
    layer.stride = (2, 2)   # "same" at stride 2 on 9x9: 5x5 outputs, (1, 1, 1, 1)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, b, stride=2, padding=1), rtol=0, atol=0)
    layer.padding = "valid"
    torch.testing.assert_close(layer(x), F.conv2d(x, w, b, stride=2), rtol=0, atol=0)
    layer.padding = (2, 0)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, b, stride=2, padding=(2, 0)), rtol=0, atol=0)
    layer.stride, layer.dilation = (1, 1), (2, 2)
    layer.padding = "same"
    torch.testing.assert_close(layer(x), F.conv2d(x, w, b, padding=2, dilation=2), rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["same", 1, (1, 0, 2, 1)])
def test_compiled_conv_warns_nothing(padding, gen):
    """The forward's memoised paddings are traced as plain functions under torch.compile:
    no warning reaches the user (Dynamo warns about functools.lru_cache wrappers)."""
    layer = gnn.Conv2d(2, 3, 3, padding=padding, stride=2, input_shape=(2, 9, 9))
    x = torch.randn(2, 2, 9, 9, generator=gen)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(layer, fullgraph=True)(x)
    assert [str(w.message) for w in caught if "gloro_fast" in str(w.filename) or "lru_cache" in str(w.message)] == []
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)


def test_conv_rejects_unsupported_options():
    with pytest.raises(ValueError, match="padding_mode"):
        gnn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        gnn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match="padding"):
        gnn.Conv2d(2, 2, 3, padding="full")
    with pytest.raises((ValueError, TypeError)):
        gnn.from_torch(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


# -- state ---------------------------------------------------------------------------

def test_conv_state_dict_round_trip(gen):
    layer = gnn.Conv2d(3, 4, 3, stride=2, padding="same", dtype=F64)
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=F64)
    y = layer(x)
    layer.lipschitz_bound(5)
    state = layer.state_dict()
    assert state["power_iterate"].shape == (1, 3, 9, 9)

    fresh = gnn.Conv2d(3, 4, 3, stride=2, padding="same", dtype=F64)
    assert fresh.input_shape is None
    fresh.load_state_dict(state)
    assert fresh.input_shape == (3, 9, 9)
    assert torch.equal(fresh.power_iterate, layer.power_iterate)
    assert torch.equal(fresh.weight, layer.weight)
    assert torch.equal(fresh.lipschitz_bound(0), layer.lipschitz_bound(0))
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError):
        fresh(torch.randn(1, 3, 10, 10, dtype=F64))

    other = gnn.Conv2d(3, 4, 3, stride=2, padding="same", dtype=F64, input_shape=(3, 7, 7))
    with pytest.raises(RuntimeError, match="power_iterate"):
        other.load_state_dict(state)


def test_linear_and_sequential_state_dict_round_trip(gen):
    def build():
        return gnn.Sequential(gnn.Conv2d(1, 2, 3, padding=1, dtype=F64), gnn.MinMax(), gnn.Flatten(),
                              gnn.Linear(2 * 5 * 5, 3, dtype=F64))

    model = build()
    model(torch.randn(1, 1, 5, 5, generator=gen, dtype=F64))
    model.lipschitz_bound(3)
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.lipschitz_bound(0), model.lipschitz_bound(0))
    assert torch.equal(fresh[3].power_iterate, model[3].power_iterate)


@pytest.mark.parametrize("move", [lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.to(dtype=F64)])
def test_double_and_to_move_the_iterate(move, gen):
    conv = gnn.Conv2d(2, 2, 3, padding=1, input_shape=(2, 5, 5))
    lin = gnn.Linear(4, 3)
    fresh = gnn.Conv2d(2, 2, 3, padding=1)
    for layer in (conv, lin, fresh):
        assert layer.power_iterate.dtype == torch.float32
        move(layer)
        assert layer.power_iterate.dtype == F64 and layer.weight.dtype == F64
    assert conv.lipschitz_bound(1).dtype == F64 and lin.lipschitz_bound(1).dtype == F64
    fresh(torch.randn(1, 2, 6, 6, dtype=F64))
    assert fresh.power_iterate.dtype == F64 and fresh.power_iterate.shape == (1, 2, 6, 6)
    assert fresh.lipschitz_bound(1).dtype == F64


def test_to_device_moves_the_iterate():
    conv = gnn.Conv2d(2, 2, 3, padding=1, input_shape=(2, 5, 5)).to("meta")
    lin = gnn.Linear(4, 3).to("meta")
    assert conv.power_iterate.device.type == "meta" and lin.power_iterate.device.type == "meta"
    assert conv.power_iterate.shape == (1, 2, 5, 5)


# -- LiResBlock -------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, k, dilation, hw", [(2, 3, 1, (5, 5)), (1, 3, 1, (6, 4)), (2, 2, 1, (4, 5)),
                                                       (2, 3, 2, (6, 6))])
def test_liresblock_bound_is_norm_of_identity_plus_conv(channels, k, dilation, hw, gen):
    block = gnn.LiResBlock(channels, k, dilation=dilation, dtype=F64, input_shape=(channels, *hw))
    with torch.no_grad():
        block.weight.copy_(0.4 * torch.randn(block.weight.shape, generator=gen, dtype=F64))
        block.bias.copy_(torch.randn(channels, generator=gen, dtype=F64))
    pads = block.pads_for(hw)
    conv = conv_matrix(block.weight, (channels, *hw), (1, 1), pads, (dilation, dilation), 1)
    a = torch.eye(conv.shape[0], dtype=F64) + conv
    exact = exact_norm(a)
    assert abs(converged(block) - exact) <= 1e-5 * exact
    # strictly better than the naive 1 + ‖conv‖ for this generic kernel, and never above it
    assert exact <= 1 + exact_norm(conv) + 1e-12
    x = torch.randn(2, channels, *hw, generator=gen, dtype=F64)
    top, bottom, left, right = pads
    ref = x + F.conv2d(F.pad(x, (left, right, top, bottom)), block.weight, block.bias, dilation=dilation)
    torch.testing.assert_close(block(x), ref, rtol=1e-13, atol=1e-13)
    assert block(x).shape == x.shape


# -- pooling, activations, flatten -------------------------------------------------------------

@pytest.mark.parametrize(
    "kernel, stride, hw",
    [(2, None, (6, 6)), (3, None, (7, 8)), ((2, 3), None, (6, 6)), (2, 3, (8, 7)), (1, None, (3, 3)),
     (4, None, (4, 4))],
)
def test_avgpool_bound_is_exact_norm(kernel, stride, hw):
    pool = gnn.AvgPool2d(kernel, stride)
    a = explicit_matrix(lambda x: pool(x), (2, *hw))
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    exact = exact_norm(a)
    assert abs(exact - 1 / math.sqrt(kh * kw)) < 1e-12
    assert abs(pool.lipschitz_bound() - exact) < 1e-12
    if kh == kw:
        assert abs(pool.lipschitz_bound() - 1 / kh) < 1e-12


def test_maxpool_is_one_lipschitz_and_tight(gen):
    pool = gnn.MaxPool2d(2)
    assert pool.lipschitz_bound() == 1.0
    worst = 0.0
    for _ in range(50):
        x = torch.randn(1, 3, 6, 6, generator=gen, dtype=F64)
        y = x + 0.3 * torch.randn(1, 3, 6, 6, generator=gen, dtype=F64)
        ratio = float((pool(x) - pool(y)).norm() / (x - y).norm())
        assert ratio <= 1 + 1e-12
        worst = max(worst, ratio)
    # a perturbation confined to the maximal entries moves the output by as much
    x = torch.zeros(1, 1, 4, 4, dtype=F64)
    x[0, 0, ::2, ::2] = 1.0
    delta = 0.5 * x
    assert abs(float((pool(x + delta) - pool(x)).norm() / delta.norm()) - 1.0) < 1e-12
    assert gnn.MaxPool2d(2, stride=3).lipschitz_bound() == 1.0


def test_minmax_is_pairwise_permutation(gen):
    mm = gnn.MinMax()
    assert mm.lipschitz_bound() == 1.0
    x = torch.randn(3, 6, 2, 2, generator=gen, dtype=F64)
    y = mm(x)
    a, b = x[:, :3], x[:, 3:]
    assert torch.equal(y[:, :3], torch.minimum(a, b)) and torch.equal(y[:, 3:], torch.maximum(a, b))
    # each pair (c, c + C/2) is permuted in place
    pairs_in = torch.stack([a, b], -1).sort(-1).values
    pairs_out = torch.stack([y[:, :3], y[:, 3:]], -1)
    assert torch.equal(pairs_in, pairs_out)
    torch.testing.assert_close(y.norm(), x.norm(), rtol=1e-15, atol=0)
    # its Jacobian at a generic point is a permutation matrix
    xv = torch.randn(1, 4, generator=gen, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda t: mm(t), xv).reshape(4, 4)
    assert torch.equal(jac.abs().sum(0), torch.ones(4, dtype=F64))
    assert torch.equal(jac.abs().sum(1), torch.ones(4, dtype=F64))
    assert set(jac.flatten().tolist()) <= {0.0, 1.0}
    # 1-Lipschitz on random pairs
    for _ in range(20):
        u = torch.randn(2, 8, generator=gen, dtype=F64)
        v = torch.randn(2, 8, generator=gen, dtype=F64)
        assert float((mm(u) - mm(v)).norm()) <= float((u - v).norm()) * (1 + 1e-12)
    with pytest.raises(ValueError, match="even"):
        mm(torch.randn(2, 3))


def test_minmax_gradient_routes_like_a_permutation(gen):
    """The gradient of each output goes to the input it came from (on exact ties a takes the
    min's and b the max's), eagerly and under torch.compile alike, for any layout."""
    mm = gnn.MinMax()
    x = torch.randn(4, 6, 3, 5, generator=gen, dtype=F64)
    x[:, 0] = x[:, 3]  # exact ties on one channel pair
    x = x.permute(0, 1, 3, 2)  # a non-contiguous input
    g = torch.randn(4, 6, 5, 3, generator=gen, dtype=F64)
    a, b = x[:, :3], x[:, 3:]
    low = a <= b
    g_lo, g_hi = g[:, :3], g[:, 3:]
    expect = torch.cat([torch.where(low, g_lo, g_hi), torch.where(low, g_hi, g_lo)], dim=1)
    eager = x.clone().requires_grad_(True)
    mm(eager).backward(g)
    assert torch.equal(eager.grad, expect)
    compiled = x.clone().requires_grad_(True)
    out = torch.compile(mm, fullgraph=True)(compiled)
    assert torch.equal(out, mm(x))
    out.backward(g)
    assert torch.equal(compiled.grad, expect)
    assert torch.autograd.gradcheck(mm, (torch.randn(2, 4, 3, generator=gen, dtype=F64).requires_grad_(),))


def test_compiled_minmax_without_autograd_has_the_eager_bits(gen):
    """Inference under torch.compile computes what the eager kernel does, bit for bit:
    NaN, signed zeros and ties included (the select form of the autograd path would give b
    where a is NaN)."""
    mm = gnn.MinMax()
    x = torch.randn(3, 8, 4, 5, generator=gen)
    x[0, 0, 0, 0], x[0, 4, 0, 1] = float("nan"), float("nan")
    x[1, 1, 2, 2], x[1, 5, 2, 2] = -0.0, 0.0
    x[2, 2] = x[2, 6]
    compiled = torch.compile(mm, fullgraph=True)
    with torch.no_grad():
        expect = mm(x)
        out = compiled(x)
    assert out.isnan().sum() == 4   # each NaN reaches its pair's min and max
    assert torch.equal(out.view(torch.int32), expect.view(torch.int32))
    # and the same as torch's minimum / maximum of the halves
    assert torch.equal(expect.view(torch.int32),
                       torch.cat([torch.minimum(x[:, :4], x[:, 4:]), torch.maximum(x[:, :4], x[:, 4:])], 1)
                       .view(torch.int32))


def test_relu_flatten_bounds(gen):
    assert gnn.ReLU().lipschitz_bound() == 1.0
    assert gnn.Flatten().lipschitz_bound() == 1.0
    x = torch.randn(2, 3, 4, generator=gen)
    assert torch.equal(gnn.Flatten()(x), x.reshape(2, 12))
    assert torch.equal(gnn.ReLU()(x), x.clamp_min(0))


def test_pools_reject_overlap_and_padding():
    with pytest.raises(ValueError, match="overlapping"):
        gnn.MaxPool2d(3, stride=2)
    with pytest.raises(ValueError, match="overlapping"):
        gnn.AvgPool2d(2, stride=1)
    with pytest.raises(ValueError, match="overlapping"):
        gnn.AvgPool2d((2, 3), stride=(2, 2))
    with pytest.raises(ValueError, match="dilation"):
        gnn.MaxPool2d(2, dilation=2)
    with pytest.raises(ValueError, match="padding"):
        gnn.AvgPool2d(2, padding=1)
    with pytest.raises(ValueError, match="overlapping"):
        gnn.from_torch(nn.MaxPool2d(3, 2))
    with pytest.raises(ValueError, match="overlapping"):
        gnn.from_torch(nn.AvgPool2d(3, 1))


# -- Sequential ---------------------------------------------------------------------------------

def test_sequential_bound_is_product(gen):
    conv = gnn.Conv2d(2, 4, 3, padding=1, dtype=F64, input_shape=(2, 4, 4))
    lin = gnn.Linear(4 * 2 * 2, 3, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=F64))
        lin.weight.copy_(planted(3, 16, gen, top=1.5))
    model = gnn.Sequential(conv, gnn.MinMax(), gnn.AvgPool2d(2), gnn.Flatten(), lin)
    assert torch.equal(model.lipschitz_bound(0), conv.lipschitz_bound(0) * 0.5 * lin.lipschitz_bound(0))
    # n_iter reaches every layer: same result as iterating the layers one by one
    twin = copy.deepcopy(model)
    expect = float(twin[0].lipschitz_bound(4).detach()) * 0.5 * float(twin[4].lipschitz_bound(4).detach())
    assert abs(float(model.lipschitz_bound(4).detach()) - expect) < 1e-14
    assert torch.equal(model[0].power_iterate, twin[0].power_iterate)
    # converged, the product of exact norms
    exact_conv = exact_norm(conv_matrix(conv.weight, (2, 4, 4), (1, 1), (1, 1, 1, 1)))
    exact = exact_conv * 0.5 * 1.5
    converged(conv)
    converged(lin)
    assert abs(float(model.lipschitz_bound(0).detach()) - exact) <= 2e-5 * exact
    # and the bound holds for the network on random input pairs
    for _ in range(10):
        x = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64)
        y = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64)
        with torch.no_grad():
            gap = float((model(x) - model(y)).norm())
        assert gap <= exact * float((x - y).norm()) * (1 + 1e-9)


def test_sequential_rejects_plain_torch_layers():
    with pytest.raises(TypeError, match="Tanh"):
        gnn.Sequential(gnn.Linear(2, 2), nn.Tanh())
    with pytest.raises(TypeError, match="Linear"):
        gnn.Sequential(nn.Linear(2, 2))
    seq = gnn.Sequential(gnn.Linear(2, 2))
    with pytest.raises(TypeError, match="Dropout"):
        seq.append(nn.Dropout())
    assert len(seq) == 1


# -- from_torch -----------------------------------------------------------------------------------

def test_from_torch_identical_outputs(gen):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 2, stride=1, padding="same", bias=False),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 10),
    ).double()
    converted = gnn.from_torch(model)
    assert isinstance(converted, gnn.Sequential)
    kinds = [gnn.Conv2d, gnn.ReLU, gnn.MaxPool2d, gnn.Conv2d, gnn.AvgPool2d, gnn.Flatten, gnn.Linear]
    assert [type(m) for m in converted] == kinds
    x = torch.randn(5, 1, 8, 8, generator=gen, dtype=F64)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-13, atol=1e-13)
    # weights are copied, not shared
    assert torch.equal(converted[0].weight, model[0].weight)
    assert converted[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert converted[3].bias is None and converted[0].weight.dtype == F64
    # and the converted model has a finite, positive bound once input sizes are known
    bound = float(converted.lipschitz_bound(2).detach())
    assert math.isfinite(bound) and bound > 0


def test_from_torch_nested_and_passthrough():
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    converted = gnn.from_torch(nn.Sequential(inner, nn.Linear(4, 2)))
    assert isinstance(converted[0], gnn.Sequential) and isinstance(converted[0][0], gnn.Linear)
    mm = gnn.MinMax()
    assert gnn.from_torch(mm) is mm


@pytest.mark.parametrize(
    "layer, name",
    [(nn.BatchNorm2d(3), "BatchNorm2d"), (nn.Dropout(0.1), "Dropout"), (nn.Sigmoid(), "Sigmoid"),
     (nn.LeakyReLU(), "LeakyReLU")],
)
def test_from_torch_rejects_unknown_layers(layer, name):
    with pytest.raises(TypeError, match=name):
        gnn.from_torch(layer)
    with pytest.raises(TypeError, match=name):
        gnn.from_torch(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), layer))


def test_iterate_check_is_skipped_only_for_the_layers_own_write(monkeypatch):
    """The stored iterate's validity check runs unless the iterate is the one the layer
    wrote itself; an in-place edit (version counter) or a replaced buffer runs it again, and
    a zero iterate is then replaced by the fixed unit vector."""
    layer = gnn.Linear(6, 4)
    checks = []
    original = torch.linalg.vector_norm

    def counting(*args, **kwargs):
        checks.append(1)
        return original(*args, **kwargs)

    layer.lipschitz_bound(1)
    monkeypatch.setattr(torch.linalg, "vector_norm", counting)
    u = layer._checked_iterate()
    assert checks == [] and u.data_ptr() == layer.power_iterate.data_ptr()
    with torch.no_grad():
        layer.power_iterate.zero_()
    u = layer._checked_iterate()
    assert checks and torch.equal(u, layer._iterate_fallback)
    monkeypatch.undo()
    sigma = layer.lipschitz_bound(1)
    assert float(sigma) > 0 and float(torch.linalg.vector_norm(layer.power_iterate)) > 0
    layer.power_iterate = torch.zeros(6)  # a new buffer: a new storage
    assert torch.equal(layer._checked_iterate(), layer._iterate_fallback)
