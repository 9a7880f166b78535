"""The paper architectures: layer sizes, "same" padding, shapes on MNIST / CIFAR /
Tiny-ImageNet inputs, activations, build() by name, and exact bounds on tiny inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gloro_fast import GloroNet, models
from gloro_fast import nn as gnn
from tests.helpers import explicit_matrix, same_conv_reference

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def plain_convs(net):
    return [m for m in net.body if isinstance(m, gnn.Conv2d) and not isinstance(m, gnn.LiResBlock)]


def dense_layers(net):
    return [m for m in net.body if isinstance(m, gnn.Linear)]


def conv_output_shapes(net, x):
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in net.body if isinstance(m, gnn.Conv2d)]
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes, out


def check_structure(net, conv_specs, dense_widths, num_classes, activation=gnn.MinMax):
    """Every conv/dense layer followed by the activation, the head bare."""
    convs = plain_convs(net)
    assert [(m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (n, (k, k), (s, s)) for n, k, s in conv_specs
    ]
    for m in convs:
        assert m.padding == "same" and m.dilation == (1, 1) and m.groups == 1
    dense = dense_layers(net)
    assert [m.out_features for m in dense] == list(dense_widths)
    layers = list(net.body)
    for k, m in enumerate(layers):
        if isinstance(m, (gnn.Conv2d, gnn.Linear)):
            assert type(layers[k + 1]) is activation, (k, layers[k + 1])
    acts = [m for m in layers if isinstance(m, (gnn.MinMax, gnn.ReLU))]
    assert all(type(a) is activation for a in acts)
    assert sum(isinstance(m, gnn.Flatten) for m in layers) == 1
    assert isinstance(net.head, gnn.Linear) and net.head.out_features == num_classes
    assert net.head.in_features == dense[-1].out_features


def assert_orthogonal(weight):
    w = weight.detach().reshape(weight.shape[0], -1).to(DT)
    g = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    torch.testing.assert_close(g, torch.eye(g.shape[0], dtype=DT), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ architectures
def test_cnn_2C2F_mnist():
    net = models.cnn_2C2F()
    assert isinstance(net, GloroNet) and net.epsilon == 0.3 and net.input_shape == (1, 28, 28)
    check_structure(net, [(16, 4, 2), (32, 4, 2)], [100], 10)
    assert [m.in_channels for m in plain_convs(net)] == [1, 16]
    assert [m.in_features for m in dense_layers(net)] == [32 * 7 * 7]
    # "same" padding for k4 s2 on 28 and 14: one pixel each side, 28 → 14 → 7
    c1, c2 = plain_convs(net)
    assert c1.pads_for((28, 28)) == (1, 1, 1, 1) and c2.pads_for((14, 14)) == (1, 1, 1, 1)
    shapes, out = conv_output_shapes(net, torch.rand(3, 1, 28, 28))
    assert shapes == [(16, 14, 14), (32, 7, 7)]
    assert out.shape == (3, 11) and torch.isfinite(out).all()
    for m in plain_convs(net) + dense_layers(net) + [net.head]:
        assert_orthogonal(m.weight)
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_cnn_2C2F_on_cifar():
    net = models.cnn_2C2F(input_shape=(3, 32, 32), num_classes=10)
    shapes, out = conv_output_shapes(net, torch.rand(2, 3, 32, 32))
    assert shapes == [(16, 16, 16), (32, 8, 8)]
    assert dense_layers(net)[0].in_features == 32 * 8 * 8
    assert out.shape == (2, 11)


def test_cnn_4C3F_mnist():
    net = models.cnn_4C3F()
    assert net.epsilon == 1.58 and net.num_classes == 10
    check_structure(net, [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512], 10)
    assert [m.in_features for m in dense_layers(net)] == [64 * 7 * 7, 512]
    shapes, out = conv_output_shapes(net, torch.rand(2, 1, 28, 28))
    assert shapes == [(32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 7, 7)]
    assert out.shape == (2, 11)
    in_shapes = [(1, 28, 28), (32, 28, 28), (32, 14, 14), (64, 14, 14)]
    assert [m.pads_for(s[1:]) for m, s in zip(plain_convs(net), in_shapes)] == [(1, 1, 1, 1)] * 4


def test_cnn_6C2F_cifar():
    net = models.cnn_6C2F()
    assert net.epsilon == 0.141 and net.input_shape == (3, 32, 32)
    specs = [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)]
    check_structure(net, specs, [512], 10)
    assert [m.in_channels for m in plain_convs(net)] == [3, 32, 32, 32, 64, 64]
    assert dense_layers(net)[0].in_features == 64 * 8 * 8
    shapes, out = conv_output_shapes(net, torch.rand(2, 3, 32, 32))
    assert shapes == [(32, 32, 32), (32, 32, 32), (32, 16, 16), (64, 16, 16), (64, 16, 16), (64, 8, 8)]
    assert out.shape == (2, 11)


def test_cnn_8C2F_tiny_imagenet():
    net = models.cnn_8C2F()
    assert net.epsilon == 0.141 and net.num_classes == 200 and net.input_shape == (3, 64, 64)
    specs = [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2),
             (256, 3, 1), (256, 4, 2)]
    check_structure(net, specs, [256], 200)
    assert dense_layers(net)[0].in_features == 256 * 8 * 8
    shapes, out = conv_output_shapes(net, torch.rand(1, 3, 64, 64))
    assert [s[1:] for s in shapes] == [(64, 64), (64, 64), (32, 32), (32, 32), (32, 32), (16, 16),
                                       (16, 16), (8, 8)]
    assert out.shape == (1, 201) and torch.isfinite(out).all()


def test_liresnet_small():
    net = models.liresnet(depth=2, width=8)
    assert net.epsilon == 0.141 and net.input_shape == (3, 32, 32)
    layers = list(net.body)
    blocks = [m for m in layers if isinstance(m, gnn.LiResBlock)]
    assert len(blocks) == 2
    for b in blocks:
        assert (b.in_channels, b.out_channels, b.kernel_size, b.stride) == (8, 8, (3, 3), (1, 1))
        assert b.residual
    stem, neck = plain_convs(net)
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 8, (3, 3), (1, 1))
    assert (neck.in_channels, neck.out_channels, neck.kernel_size, neck.stride) == (8, 16, (4, 4), (4, 4))
    assert layers.index(stem) < layers.index(blocks[0]) < layers.index(blocks[1]) < layers.index(neck)
    check_structure(net, [(8, 3, 1), (16, 4, 4)], [512], 10)
    for m in [stem, *blocks, neck]:
        assert type(layers[layers.index(m) + 1]) is gnn.MinMax
    assert dense_layers(net)[0].in_features == 16 * 8 * 8
    shapes, out = conv_output_shapes(net, torch.rand(2, 3, 32, 32))
    assert shapes == [(8, 32, 32), (8, 32, 32), (8, 32, 32), (16, 8, 8)]
    assert out.shape == (2, 11)


def test_liresnet_block_is_identity_plus_conv():
    net = models.liresnet(input_shape=(3, 8, 8), depth=1, width=4)
    block = next(m for m in net.body if isinstance(m, gnn.LiResBlock))
    x = torch.randn(2, 4, 8, 8)
    expect = x + F.conv2d(x, block.weight, block.bias, padding=1)
    torch.testing.assert_close(block(x), expect, rtol=1e-5, atol=1e-5)


def test_activation_relu():
    for net, n_acts in [(models.cnn_2C2F(activation="relu"), 3),
                        (models.cnn_4C3F(activation="relu"), 6),
                        (models.liresnet(input_shape=(3, 8, 8), depth=2, width=4, activation="relu"), 5)]:
        acts = [m for m in net.body if isinstance(m, (gnn.ReLU, gnn.MinMax))]
        assert len(acts) == n_acts and all(type(a) is gnn.ReLU for a in acts)
    check_structure(models.cnn_2C2F(activation="relu"), [(16, 4, 2), (32, 4, 2)], [100], 10, gnn.ReLU)
    net = models.cnn_2C2F(activation="relu")
    x = torch.randn(2, 1, 28, 28)
    h = x
    with torch.no_grad():
        for m in net.body:
            h = m(h)
            if isinstance(m, gnn.ReLU):
                assert (h >= 0).all()
    for bad in ("tanh", "ReLU", None):
        with pytest.raises(ValueError, match="activation"):
            models.cnn_2C2F(activation=bad)
        with pytest.raises(ValueError, match="activation"):
            models.liresnet(input_shape=(3, 8, 8), depth=1, width=4, activation=bad)


# ------------------------------------------------------------- exact bounds, tiny inputs


def exact_body_norm(net):
    shape = net.input_shape
    K = 1.0
    for m in net.body:
        if isinstance(m, gnn.Conv2d):
            w = m.weight.detach()

            def op(u, m=m, w=w):
                return same_conv_reference(m, u, w)

            K *= float(torch.linalg.matrix_norm(explicit_matrix(op, shape), ord=2))
            with torch.no_grad():
                shape = tuple(m(torch.zeros((1,) + shape, dtype=DT)).shape[1:])
        elif isinstance(m, gnn.Linear):
            K *= float(torch.linalg.matrix_norm(m.weight.detach(), ord=2))
    return K


@pytest.mark.parametrize("name,kw,seed", [
    ("2C2F", dict(input_shape=(1, 8, 8)), 0),
    # tiny grids keep the top singular values of the convolutions apart (seed chosen so
    # that the power iteration needs a few hundred steps, not tens of thousands)
    ("liresnet", dict(input_shape=(3, 4, 4), depth=2, width=4), 3),
])
def test_lipschitz_constant_exact_on_tiny_inputs(name, kw, seed):
    torch.manual_seed(seed)
    net = models.build(name, num_classes=3, epsilon=0.1, tol=1e-12, max_iter=20000, **kw).double()
    # move away from orthogonal init: its singular values are all 1 up to float32 rounding,
    # a cluster on which power iteration stalls (σ̂ is then only a lower bound to ~1e-7)
    with torch.no_grad():
        for m in net.body:
            if isinstance(m, (gnn.Conv2d, gnn.Linear)):
                m.weight.add_(0.5 * torch.randn_like(m.weight))
    K = exact_body_norm(net)
    got = float(net.lipschitz_constant())
    assert abs(got / K - 1) < 1e-8, (got, K)


# ------------------------------------------------------------------------------- build
def test_build_by_name():
    assert set(models.ARCHITECTURES) == {"2C2F", "4C3F", "6C2F", "8C2F", "liresnet"}
    net = models.build("2C2F", (1, 28, 28), 10, 0.45, bound="global")
    assert isinstance(net, GloroNet)
    assert net.epsilon == 0.45 and net.bound == "global" and net.num_classes == 10
    check_structure(net, [(16, 4, 2), (32, 4, 2)], [100], 10)
    net = models.build("6C2F", (3, 32, 32), 7, 0.2)
    assert net.num_classes == 7 and net(torch.rand(1, 3, 32, 32)).shape == (1, 8)
    net = models.build("liresnet", (3, 16, 16), 4, 0.1, depth=1, width=4)
    assert sum(isinstance(m, gnn.LiResBlock) for m in net.body) == 1
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 5)


def test_build_errors():
    with pytest.raises(ValueError, match="architecture"):
        models.build("9C9F", (1, 28, 28), 10, 0.3)
    with pytest.raises(ValueError, match="architecture"):
        models.build("2c2f", (1, 28, 28), 10, 0.3)
    with pytest.raises(ValueError, match="input_shape"):
        models.cnn_2C2F(input_shape=(28, 28))
    with pytest.raises(ValueError, match="input_shape"):
        models.cnn_2C2F(input_shape=(1, 0, 28))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="depth"):
            models.liresnet(input_shape=(3, 8, 8), depth=bad, width=4)
        with pytest.raises(ValueError, match="width"):
            models.liresnet(input_shape=(3, 8, 8), depth=1, width=bad)
    with pytest.raises(ValueError, match="epsilon"):
        models.cnn_2C2F(epsilon=-1.0)
    with pytest.raises(ValueError, match="head"):
        models.cnn_2C2F(num_classes=1)
