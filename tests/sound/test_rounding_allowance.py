"""The rounding allowance against measured rounding errors: a float32 network's computed
features and logits stay within the bounds Δ(x), ρ(x) of the certifying pass, at x and
anywhere in the ball around it, compared with the same network evaluated in float64
(whose own, far smaller, allowance is added to the tolerance). Both the per-sample bound
(a chain of layers) and the a-priori one (any other body) are checked."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gloro_fast import nn as gnn
from gloro_fast.bounds import Allowance, chain_layers
from tests.sound.sound_fixtures import sample_points, small_cnn, trained_cnn


class Chain(gnn.LipschitzModule):
    """A body that is not a Sequential (so the certifying pass cannot record activation
    norms layer by layer): the a-priori bound applies."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def lipschitz_bound(self, n_iter=0):
        bound = 1.0
        for layer in self.layers:
            bound = bound * layer.lipschitz_bound(n_iter)
        return bound

    def lipschitz_upper_bound(self):
        return torch.tensor(1.0, dtype=torch.float64) * torch.stack(
            [layer.lipschitz_upper_bound() for layer in self.layers]).prod() * (1 + 1e-15)

    def forward_bound(self, bound, arith, upper_of):
        for layer in self.layers:
            bound = layer.forward_bound(bound, arith, upper_of)
        return bound


def as_chain(model):
    out = copy.deepcopy(model)
    out.body = Chain(*out.body)
    return out


def features(model, x):
    """The certifying pass's features: each layer's ``certifying_forward`` for a chain (the
    evaluation the per-sample bound describes), the body's own forward otherwise."""
    with torch.no_grad():
        if isinstance(model.body, gnn.Sequential):
            for layer in chain_layers(model):
                x = layer.certifying_forward(x)
            return x
        return model.body(x)


def inputs():
    """Test digits, the same scaled up (larger activations, larger errors) and noise."""
    x, _ = sample_points(60)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(20, *x.shape[1:], generator=gen)
    return torch.cat([x, 30.0 * x[:20], noise, 1e4 * noise[:5]])


@pytest.mark.parametrize("body", ["chain", "a-priori"])
def test_errors_at_x_within_allowance(body):
    model = trained_cnn() if body == "chain" else as_chain(trained_cnn())
    x = inputs()
    logits, bounds, allowance = model.sound_forward(x)
    assert (bounds.steps is None) == (body == "a-priori")
    reference = copy.deepcopy(model).double()
    x64 = x.double()
    logits64, _, allowance64 = reference.sound_forward(x64)
    h32 = features(model, x).double()
    h64 = features(reference, x64)
    err = torch.linalg.vector_norm(h32 - h64, dim=1)
    slack = allowance64.body_error
    assert (err <= allowance.body_error + slack).all()
    assert (err > 0).any()  # the float32 pass does round
    # one logit: |f̃_i − f_i| ≤ ‖w_i‖Δ + ρ (float64 logits as the reference)
    w = model.head.weight.detach().double()
    per_logit = (torch.linalg.vector_norm(w, dim=1).unsqueeze(0) * (allowance.body_error + slack).unsqueeze(1)
                 + (allowance.logit_error + allowance64.logit_error).unsqueeze(1))
    assert ((logits.double() - logits64).abs() <= per_logit).all()
    # the bounds are not vacuous: within a few orders of magnitude of what happens
    assert float((allowance.body_error / err.clamp_min(1e-30)).median()) < 1e5


@pytest.mark.parametrize("body", ["chain", "a-priori"])
def test_errors_in_the_ball_within_allowance(body):
    """For x′ with ‖x′ − x‖ ≤ ε the computed features' error stays within the far part of
    s1(ε) = εK + Δ(x) + Δ(x′): s1(ε) − εK − Δ(x) ≥ ‖h̃(x′) − h(x′)‖."""
    model = trained_cnn() if body == "chain" else as_chain(trained_cnn())
    reference = copy.deepcopy(model).double()
    x = inputs()[:40]
    eps = 0.5
    _, bounds, allowance = model.sound_forward(x)
    far = allowance.s1 + eps * allowance.s1_slope - eps * bounds.lipschitz - allowance.body_error
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        d = torch.randn(x.shape, generator=gen)
        d = d / torch.linalg.vector_norm(d.flatten(1), dim=1).view(-1, 1, 1, 1) * eps
        moved = x + d
        err = torch.linalg.vector_norm(features(model, moved).double() - features(reference, moved.double()), dim=1)
        assert (err <= far * (1 + 1e-9)).all()


def test_a_priori_bound_dominates_the_per_sample_one():
    model = trained_cnn()
    x = inputs()
    _, bounds, per_sample = model.sound_forward(x)
    a_priori = bounds.allowance(x)  # no activation norms: the a-priori bound
    assert isinstance(a_priori, Allowance)
    assert (per_sample.body_error <= a_priori.body_error * (1 + 1e-9)).all()
    assert (per_sample.s1 <= a_priori.s1 * (1 + 1e-9)).all()
    # and a body that is not a chain certifies no more than the chain
    chain = as_chain(model)
    assert (chain.certified_radius(x) <= model.certified_radius(x) * (1 + 1e-9)).all()


def test_allowance_grows_with_the_unit_roundoff():
    """float64 allowances are ~2⁻²⁹ of the float32 ones (u₆₄/u₃₂)."""
    model = small_cnn()
    x, _ = sample_points(10)
    a32 = model.sound_forward(x)[2].body_error
    a64 = copy.deepcopy(model).double().sound_forward(x.double())[2].body_error
    ratio = (a64 / a32)
    assert (ratio < 1e-8).all() and (ratio > 1e-10).all()


def test_huge_inputs_are_not_admissible():
    """Inputs (or balls) whose partial sums could overflow are never certified."""
    model = trained_cnn()
    x, _ = sample_points(4)
    huge = x * 2e37  # pixels ≤ 2e37: the convolutions' partial sums may pass 1.7e38
    assert (model.certify(huge, epsilon=0.0) == 10).all()
    assert (model.certified_radius(huge) == 0).all()
    # computed without overflow (activation norms are taken in float32, whose squares stay
    # finite below 2⁶⁴ ≈ 1.8e19): certifiable at ε = 0 ...
    large = x * 1e17
    assert (model.certify(large, epsilon=0.0) < 10).all()
    # ... but not in a ball reaching into the overflowing range, whatever the margins
    assert (model.certify(large, epsilon=1e38) == 10).all()
    radius = model.certified_radius(large)
    assert (radius < 1e38).all()


def test_forms_hold_no_subnormal_coefficient():
    """Coefficients that round up from zero are raised to TINY instead of the subnormal
    2⁻¹⁰⁷⁴ (subnormal products take the CPU's slow path): every coefficient and slope is 0 or
    ≥ TINY, and the coefficients still dominate those of the exact forms built without it."""
    from gloro_fast.sound.decision import TINY

    bounds = trained_cnn().sound_bounds()
    for forms in (bounds.forms.per_sample, bounds.forms.a_priori):
        values = torch.cat([forms.matrix.flatten(), forms.slopes])
        assert ((values == 0) | (values >= TINY)).all()
        tiny_normal = torch.finfo(torch.float64).tiny
        assert not ((values > 0) & (values < tiny_normal)).any()
        assert (forms.safe_slopes >= tiny_normal).all()
