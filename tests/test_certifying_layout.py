"""The certifying pass's layout: on the CPU, a body that opens with a convolution runs on its
input laid out channels_last (gloro_fast.nn.conv.channels_last), in the live model and the
frozen one alike; training keeps the caller's layout."""
from __future__ import annotations

import pytest
import torch

import gloro_fast as gf
import gloro_fast.gloro_net as gloro_net
from gloro_fast import GloroNet
from gloro_fast import nn as gnn
from gloro_fast.export import freeze
from gloro_fast.models import cnn_2C2F
from gloro_fast.nn.conv import channels_last
from tests.ops.cpp_helpers import has_cpu_kernels


def _is_channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_keeps_the_values_and_the_caller_tensor(channels):
    x = torch.randn(5, channels, 6, 7)
    before = x.clone()
    y = channels_last(x)
    assert torch.equal(y, x) and torch.equal(x, before) and x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last)
    if channels == 1:  # the same bytes, viewed with channels_last strides
        assert y.data_ptr() == x.data_ptr() and y.stride() == (42, 1, 7, 1)
    else:
        assert y.data_ptr() != x.data_ptr() and _is_channels_last(y)
    # a non-contiguous one-channel input is made contiguous first (a view of it would not be)
    z = torch.randn(5, 2, 6, 7)[:, 1:]
    assert torch.equal(channels_last(z), z)


def _record_conv_inputs(model):
    seen = []
    for m in model.modules():
        if isinstance(m, (gnn.Conv2d, torch.nn.Conv2d)):
            # channels first in memory (stride 1), which a one-channel NCHW tensor is not
            m.register_forward_pre_hook(lambda mod, args: seen.append(
                args[0].stride(1) == 1 and args[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


def _net(channels=1):
    torch.manual_seed(0)
    return cnn_2C2F(input_shape=(channels, 12, 12), num_classes=4, epsilon=0.05)


@pytest.mark.parametrize("channels", [1, 3])
def test_certification_runs_the_convolutions_channels_last_and_training_does_not(channels):
    model = _net(channels)
    x = torch.rand(16, channels, 12, 12, generator=torch.Generator().manual_seed(1))
    seen = _record_conv_inputs(model)
    model.train()(x)
    assert seen == [False, False]           # the caller's layout in training
    for call in (lambda: model.eval()(x), lambda: model.certify(x), lambda: model.certified_radius(x),
                 lambda: model.certify(x, certificate="estimate"),
                 lambda: model.certified_radius(x, certificate="estimate")):
        seen.clear()
        call()
        assert seen and all(seen), seen     # every convolution of the pass, channels_last
    assert x.is_contiguous()                # the caller's tensor is left as it was


def test_a_body_opening_with_another_layer_keeps_the_layout():
    torch.manual_seed(0)
    body = gnn.Sequential(gnn.AvgPool2d(2), gnn.Conv2d(1, 4, 3, padding=1), gnn.MinMax(), gnn.Flatten(),
                          gnn.Linear(256, 8), gnn.MinMax())
    model = GloroNet(body, gnn.Linear(8, 3), epsilon=0.05, input_shape=(1, 16, 16)).eval()
    seen = _record_conv_inputs(model)
    model.certify(torch.rand(4, 1, 16, 16))
    assert seen == [False]
    assert not freeze(model).opens_with_convolution


def test_the_layout_changes_no_decision(monkeypatch):
    """Channels_last convolutions sum in another order: the logits move by a few units in
    the last place, the decisions and radii by no more than that (the allowance covers any
    order; here no sample sits that close to its threshold)."""
    model = _net().eval()
    x = torch.rand(512, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    logits, cert, radius = model(x), model.certify(x), model.certified_radius(x)
    monkeypatch.setattr(gloro_net, "_convolution_layout", lambda x, first: x)
    assert torch.equal(model.certify(x), cert)
    torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.certified_radius(x), radius, rtol=1e-4, atol=1e-7)
    assert (cert < 4).any() and (cert == 4).any()


def test_the_frozen_model_takes_the_same_layout():
    model = _net().eval()
    frozen = freeze(model)
    assert frozen.opens_with_convolution
    # the MinMax flattened next writes the flattened order (no copy at the flatten)
    flags = [m.contiguous_out for m in frozen.body if type(m).__name__ == "MinMax"]
    assert flags == [False, True, False]
    flat_inputs = []
    frozen.body[4].register_forward_pre_hook(lambda mod, args: flat_inputs.append(args[0].is_contiguous()))
    seen = _record_conv_inputs(frozen)
    x = torch.rand(8, 1, 12, 12)
    out = frozen(x)
    assert seen and all(seen) and flat_inputs == [True]
    # bit for bit with the live pass on the same kernels (torch ops: the fused MinMax norms
    # of the compiled backend are tighter than the frozen model's)
    with gf.ops.use_backend("reference"), torch.no_grad():
        assert torch.equal(out, model(x)) and torch.equal(frozen.certify(x), model.certify(x))


@pytest.mark.skipif(not has_cpu_kernels("minmax_norm"), reason="gloro_fast._C without minmax_norm")
def test_the_minmax_before_the_flatten_writes_the_flattened_order():
    """The last MinMax of the convolutions writes its output contiguous (the fused kernel's
    contiguous_out): the flatten that follows copies nothing."""
    model = _net(3).eval()
    flat_inputs = []
    model.body[4].register_forward_pre_hook(lambda mod, args: flat_inputs.append(args[0]))
    x = torch.rand(16, 3, 12, 12)
    with gf.ops.use_backend("cpp"):
        model.certify(x)
    assert isinstance(model.body[4], gnn.Flatten) and flat_inputs[0].is_contiguous()


needs_minmax_kernel = pytest.mark.skipif(not has_cpu_kernels("minmax_norm"), reason="gloro_fast._C without minmax_norm")


def _record_overwrites(calls):
    from gloro_fast.ops import resolve_backend
    from tests.ops.cpp_helpers import recording_forward

    assert resolve_backend(torch.device("cpu"), "minmax_norm_") == "cpp"
    return recording_forward("minmax_norm_", "cpp", lambda t: calls.append(t.dim()))


@needs_minmax_kernel
def test_minmax_overwrites_the_fresh_affine_outputs_and_nothing_else(monkeypatch):
    """The eager certifying pass writes MinMax over the output of the convolution or dense
    layer before it (minmax_norm_), except where the output is flattened next (a new
    contiguous tensor): the same logits, decisions and radii as without overwriting, and
    the caller's x untouched."""
    model = _net(3).eval()
    x = torch.rand(64, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    calls = []
    with gf.ops.use_backend("cpp"), torch.no_grad(), _record_overwrites(calls):
        logits, cert, radius = model(x), model.certify(x), model.certified_radius(x)
    assert calls == [4, 2] * 3             # after the first convolution and after the dense layer
    assert torch.equal(x, before)
    monkeypatch.setattr(gloro_net, "_overwritable", lambda *args: False)
    calls.clear()
    with gf.ops.use_backend("cpp"), torch.no_grad(), _record_overwrites(calls):
        assert torch.equal(model(x), logits) and torch.equal(model.certify(x), cert)
        assert torch.equal(model.certified_radius(x), radius)
    assert calls == [] and (cert < 4).any() and (cert == 4).any()


@needs_minmax_kernel
def test_a_liresnet_overwrites_its_residual_blocks_outputs(monkeypatch):
    """LiResBlock's output (x + conv(x)) is a fresh tensor too: the MinMax after each block
    writes over it, with the decisions and radii of the pass that does not."""
    from gloro_fast.models import liresnet

    torch.manual_seed(0)
    model = liresnet(input_shape=(3, 8, 8), num_classes=4, epsilon=0.05, width=8, depth=2).eval()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    calls = []
    with gf.ops.use_backend("cpp"), torch.no_grad(), _record_overwrites(calls):
        cert, radius = model.certify(x), model.certified_radius(x)
    blocks = sum(isinstance(m, gnn.LiResBlock) for m in model.body.modules())
    assert blocks == 2 and calls.count(4) >= 2 * blocks   # after each block, in both calls
    monkeypatch.setattr(gloro_net, "_overwritable", lambda *args: False)
    with gf.ops.use_backend("cpp"), torch.no_grad():
        assert torch.equal(model.certify(x), cert) and torch.equal(model.certified_radius(x), radius)


@needs_minmax_kernel
def test_compiled_certification_overwrites_too():
    """Under torch.compile the overwriting op is functionalised and Inductor writes it in
    place again: the same calls as eager, the eager decisions."""
    from tests.ops.cpp_helpers import compiled_certify

    model = _net(3).eval()
    x = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    before = x.clone()
    eager = model.certify(x)
    calls = []
    with gf.ops.use_backend("cpp"), _record_overwrites(calls):
        compiled = compiled_certify(model, x)
    assert torch.equal(compiled, eager) and torch.equal(x, before)
    assert calls == [4, 2]


@needs_minmax_kernel
@pytest.mark.parametrize("where", ["layer", "global"])
def test_a_hooked_layer_keeps_its_output(where):
    """A forward hook may keep the output it sees (feature extraction): the MinMax after a
    layer with hooks, its own or global ones, writes a new tensor, and the kept output is the
    convolution's."""
    model = _net(3).eval()
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    conv = model.body[0]
    kept = []
    hook = (conv.register_forward_hook(lambda mod, args, out: kept.append(out)) if where == "layer"
            else torch.nn.modules.module.register_module_forward_hook(
                lambda mod, args, out: kept.append(out) if mod is conv else None))
    calls = []
    try:
        with gf.ops.use_backend("cpp"), torch.no_grad(), _record_overwrites(calls):
            model.certify(x)
    finally:
        hook.remove()
    assert calls == ([2] if where == "layer" else [])  # the dense layer's output only, unhooked
    with torch.no_grad():
        want = conv(channels_last(x))  # the hook is gone: the convolution's output, fresh
    assert len(kept) == 1
    torch.testing.assert_close(kept[0], want, rtol=1e-5, atol=1e-6)
    assert not (kept[0] >= 0).all() or not (kept[0] <= 0).all()


@needs_minmax_kernel
def test_no_overwrite_of_the_input_or_under_autograd():
    """A MinMax opening the body gets the caller's x: never overwritten. With grad mode on,
    the eval forward's activations are in the autograd graph (the weights require grad):
    nothing is overwritten and the gradient is the one of the non-fused pass."""
    torch.manual_seed(0)
    body = gnn.Sequential(gnn.MinMax(), gnn.Flatten(), gnn.Linear(36, 8), gnn.MinMax())
    model = GloroNet(body, gnn.Linear(8, 3), epsilon=0.05, input_shape=(4, 3, 3)).eval()
    x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    calls = []
    with gf.ops.use_backend("cpp"), _record_overwrites(calls):
        model.certify(x)
        assert calls == [2] and torch.equal(x, before)  # the MinMax after the dense layer only
        calls.clear()
        conv = _net().eval()
        xg = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)
        grad, = torch.autograd.grad(conv(xg)[:, :-1].sum(), xg)
        assert calls == []
    with gf.ops.use_backend("reference"):
        want, = torch.autograd.grad(conv(xg)[:, :-1].sum(), xg)
    torch.testing.assert_close(grad, want)
