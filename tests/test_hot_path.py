"""The hot-path rules of docs/architecture.md: no host synchronisation in a training step
(forward, loss, backward) or in certification once the bounds are cached, and both compile
with ``torch.compile(fullgraph=True)`` to the eager results.

A host synchronisation is a device value read on the host: ``Tensor.item``, ``bool``,
``int``, ``float``, ``tolist``, ``numpy``, ``cpu``. On this CPU machine none of them
stalls, so the test counts the calls instead (each would stall a GPU pipeline and forbid
CUDA-graph capture)."""
import collections
import copy
import traceback

import pytest
import torch

import gloro_fast as gf
from gloro_fast import models
from gloro_fast import nn as gnn

SYNCS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts (and locates) every host read of a tensor value while the fixture's
    ``counting()`` context is active."""
    calls = collections.Counter()
    active = [False]

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if active[0]:
                frame = traceback.extract_stack(limit=3)[0]
                calls[f"{name} at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

    class Counting:
        def __enter__(self):
            calls.clear()
            active[0] = True
            return calls

        def __exit__(self, *exc):
            active[0] = False

    return Counting


def _model(**kwargs):
    torch.manual_seed(0)
    return models.cnn_2C2F(input_shape=(1, 12, 12), **kwargs)


def _batch(n=8):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _training_loss(model, x, y):
    out = model(x, parts=True)
    return gf.losses.trades_loss(out.augmented, y, lam=1.0)


@pytest.mark.parametrize("loss", ["trades", "gloro_ce"])
def test_training_step_reads_nothing_on_the_host(host_reads, loss):
    model = _model().train()
    x, y = _batch()
    fn = {"trades": lambda o: gf.losses.trades_loss(o.augmented, y, lam=1.0),
          "gloro_ce": lambda o: gf.losses.gloro_cross_entropy(o.augmented, y)}[loss]
    fn(model(x, parts=True)).backward()          # first step: shapes and iterates set up
    with host_reads() as calls:
        out = model(x, parts=True)
        fn(out).backward()
    assert not calls, dict(calls)


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_certification_reads_nothing_on_the_host_once_bounds_are_cached(host_reads, certificate):
    model = _model().eval()
    x, _ = _batch()
    model.certify(x, certificate=certificate)   # computes and caches the bounds
    with host_reads() as calls:
        model.certify(x, certificate=certificate)
        model.certify(x, epsilon=0.5, certificate=certificate)
        model.certified_radius(x, certificate=certificate)
        if certificate == "sound":
            model(x)
    assert not calls, dict(calls)


def test_debug_mode_reads_values_and_says_so(host_reads):
    """The value checks exist, and run only in debug mode (the counter sees them)."""
    model = _model().train()
    x, y = _batch()
    _training_loss(model, x, y).backward()
    gf.set_debug(True)
    try:
        with host_reads() as calls:
            _training_loss(model, x, y)
    finally:
        gf.set_debug(None)
    assert calls


def test_compiled_training_forward_and_loss_fullgraph():
    eager = _model().train()
    compiled_model = copy.deepcopy(eager)
    x, y = _batch()
    ref = _training_loss(eager, x, y)
    ref.backward()
    step = torch.compile(lambda a, b: _training_loss(compiled_model, a, b), fullgraph=True)
    got = step(x, y)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_compiled_certification_fullgraph_matches_eager(certificate):
    model = _model().eval()
    x, _ = _batch(16)
    expected_radius = model.certified_radius(x, certificate=certificate)
    low, high = expected_radius.sort().values[7:9].tolist()
    eps = (low + high) / 2                          # half the points certified, none at the edge
    expected = model.certify(x, epsilon=eps, certificate=certificate)
    certify = torch.compile(lambda t: model.certify(t, epsilon=eps, certificate=certificate), fullgraph=True)
    radius = torch.compile(lambda t: model.certified_radius(t, certificate=certificate), fullgraph=True)
    assert torch.equal(certify(x), expected)
    assert (expected < 10).any() and (expected == 10).any()
    # the compiled convolutions may round differently (both within the allowance; eager runs
    # them channels_last on the CPU): a logit moved by an ulp (~6e-8) moves a radius by ~1e-8
    torch.testing.assert_close(radius(x), expected_radius, rtol=1e-5, atol=1e-7)
    # a weight edited behind the version counters: the compiled graph certifies nothing
    # (the bounds are its constants) until an eager query recomputes them
    with torch.no_grad():
        model.body[0].weight.data.mul_(3.0)
    assert (certify(x) == 10).all()
    assert (radius(x) == 0).all()
    getattr(model, f"{certificate}_bounds")()
    assert torch.equal(certify(x), model.certify(x, epsilon=eps, certificate=certificate))


def test_compiled_certification_needs_eagerly_computed_bounds():
    model = _model().eval()
    x, _ = _batch()
    with pytest.raises(Exception, match="eagerly"):
        torch.compile(model.certify, fullgraph=True)(x)


def test_compiled_certification_refuses_bounds_of_a_swapped_layer():
    """A parameterless layer swapped after compiling (the network's K doubles, no weight
    changes): the retraced graph refuses the old bounds until they are recomputed eagerly."""
    from tests.test_model import _pool_net

    net = _pool_net(gnn.AvgPool2d(2))
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    net.sound_bounds()
    certify = torch.compile(net.certify, fullgraph=True)
    assert torch.equal(certify(x), net.certify(x))
    net.body[2] = gnn.MaxPool2d(2)
    with pytest.raises(Exception, match="after changing the network's layers or settings"):
        certify(x)
    net.sound_bounds()
    assert torch.equal(certify(x), _pool_net(gnn.MaxPool2d(2)).certify(x))


def test_compiled_sound_certification_refuses_unsafe_inductor_math():
    from torch._inductor import config

    model = _model().eval()
    x, _ = _batch()
    model.sound_bounds()
    torch._dynamo.reset()
    with config.patch({"cpp.enable_unsafe_math_opt_flag": True}):
        with pytest.raises(Exception, match="IEEE arithmetic"):
            torch.compile(model.certify, fullgraph=True)(x)
    torch._dynamo.reset()
