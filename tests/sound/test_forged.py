"""Checkpoints forged the ways an attacker would (each passes ``weights_only=True``): with
``certificate="sound"`` none certifies anything it should not. Also: a point the estimate
certifies and the sound test rejects, margins within the rounding allowance, non-finite
weights, and autocast."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import gloro_fast as gf
from gloro_fast import nn as gnn
from gloro_fast.ops import use_backend
from tests.sound.sound_fixtures import sample_points, trained_cnn


def forged_copy(model, edit):
    """model → state_dict → edit → bytes → torch.load(weights_only=True) → a fresh model."""
    state = copy.deepcopy(model.state_dict())
    edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    forged = copy.deepcopy(model)
    forged.load_state_dict(torch.load(buffer, weights_only=True))
    return forged.eval()


def test_zero_iterates_change_nothing_sound():
    model = trained_cnn()
    x, _ = sample_points(200)

    def zero(state):
        for key in state:
            if key.endswith("power_iterate"):
                state[key].zero_()

    forged = forged_copy(model, zero)
    assert forged.sound_bounds().lipschitz == model.sound_bounds().lipschitz
    assert torch.equal(forged.certify(x), model.certify(x))
    assert torch.equal(forged.certified_radius(x), model.certified_radius(x))
    # nothing is certified at ε = 100 (the forged estimate once claimed K = 0)
    assert (forged.certify(x, epsilon=100.0) == 10).all()
    # the estimate does not trust a zero iterate either: it restarts from a fixed vector
    est = float(forged.lipschitz_constant("estimate"))
    assert abs(est / float(model.lipschitz_constant("estimate")) - 1) < 1e-2
    assert (forged.certify(x, epsilon=100.0, certificate="estimate") == 10).all()


def test_nonfinite_iterate_is_replaced():
    model = trained_cnn()
    forged = forged_copy(model, lambda s: s["body.0.power_iterate"].fill_(math.nan))
    assert math.isfinite(float(forged.lipschitz_constant("estimate")))
    layer = forged.body[0]
    assert torch.isfinite(layer.lipschitz_bound(1)).all()  # training steps recover too
    assert torch.isfinite(layer.power_iterate).all()


def diag_model():
    """A 16→16 layer diag(100, 1, …, 1) and a head reading unit 0 only: f_0 − f_1 = 200·x_0."""
    body = gnn.Sequential(gnn.Linear(16, 16, bias=False, dtype=torch.float64))
    head = gnn.Linear(16, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        body[0].weight.copy_(torch.diag(torch.tensor([100.0] + [1.0] * 15, dtype=torch.float64)))
        head.weight.zero_()
        head.weight[0, 0], head.weight[1, 0] = 1.0, -1.0
    return gf.GloroNet(body, head, epsilon=1.0, input_shape=(16,)).eval()


def test_iterate_on_a_small_singular_vector_fools_only_the_estimate():
    model = diag_model()
    e16 = torch.zeros(16, dtype=torch.float64)
    e16[15] = 1.0
    forged = forged_copy(model, lambda s: s["body.0.power_iterate"].copy_(e16))
    x = torch.zeros(1, 16, dtype=torch.float64)
    x[0, 0] = 0.005                     # margin f_0 − f_1 = 1
    flipped = x.clone()
    flipped[0, 0] -= 0.02               # 0.02 away: f_0 − f_1 = −3
    # the estimate stays on e16 (an eigenvector of σ = 1): K = 1, radius 0.5; the bracket
    # shows it, with a warning
    k_est = float(forged.lipschitz_constant("estimate"))
    with pytest.warns(RuntimeWarning, match=r"bracket \[1, 100\]"):
        bracket = forged.lipschitz_bracket()[0]
    assert bracket.lower == pytest.approx(1.0) and bracket.upper >= 100.0
    assert forged.forward_parts(flipped, certificate="estimate").logits.argmax(1).item() == 1
    assert abs(k_est - 1.0) < 1e-12
    assert float(forged.certified_radius(x, certificate="estimate")) > 0.02
    assert forged.certify(x, epsilon=0.4, certificate="estimate").item() == 0
    # the sound certificate knows K ≥ 100 and never claims the flipped point's distance
    assert float(forged.lipschitz_constant()) >= 100.0
    radius = float(forged.certified_radius(x))
    assert radius <= 0.005 and radius > 0.0049
    assert forged.certify(x, epsilon=0.02).item() == 2
    assert forged.certify(x, epsilon=0.4).item() == 2
    assert forged.certify(x, epsilon=0.004).item() == 0


def test_tolerance_and_iteration_count_cannot_weaken_sound():
    model = trained_cnn()
    x, _ = sample_points(200)
    with pytest.raises(ValueError, match="tol"):
        gf.GloroNet(copy.deepcopy(model.body), copy.deepcopy(model.head), 0.3, tol=0.999999)
    loose = forged_copy(model, lambda s: [s[k].zero_() for k in s if k.endswith("power_iterate")])
    loose.tol, loose.max_iter = 1e-2, 1
    assert loose.sound_bounds().lipschitz == model.sound_bounds().lipschitz
    assert torch.equal(loose.certify(x), model.certify(x))
    # the estimate from one iteration of a restarted iterate is poor, and says so
    with pytest.warns(RuntimeWarning, match="max_iter"):
        loose.lipschitz_constant("estimate")


def rescaled(model, factor):
    """The same function with layer 0 (and the bias after it) × 1/factor and the dense
    layer × factor: MinMax commutes with positive scaling."""
    def edit(state):
        state["body.0.weight"] /= factor
        state["body.0.bias"] /= factor
        state["body.2.bias"] /= factor
        state["body.5.weight"] *= factor
    return forged_copy(model, edit)


def test_function_preserving_rescaling_keeps_sound_certificates():
    model = trained_cnn()
    x, _ = sample_points(200)
    forged = rescaled(model, 1e22)
    k, k_forged = model.sound_bounds().lipschitz, forged.sound_bounds().lipschitz
    assert abs(k_forged / k - 1) < 1e-5
    base = model.certify(x, epsilon=0.3)
    got = forged.certify(x, epsilon=0.3)
    # the float32 forward of the rescaled net rounds differently: decisions may only differ
    # where a certified margin sits within the allowance; they never certify more than the
    # margins allow (checked against the unscaled model's radii)
    radius = model.certified_radius(x)
    differ = got != base
    assert int(differ.sum()) <= 2
    assert (radius[differ] - 0.3).abs().max() < 0.05 if differ.any() else True
    # nothing certified at ε = 3 (the forged estimate once certified every point)
    assert (forged.certify(x, epsilon=3.0) == 10).all()


def test_overflowing_iterate_recovers_after_the_weights_do():
    """An overflow must not zero an iterate for good (reference backend)."""
    model = copy.deepcopy(trained_cnn())
    with use_backend("reference"):
        layer = model.body[0]
        saved = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.mul_(1e30)
            layer.lipschitz_bound(3)
            layer.weight.copy_(saved)
        sigma = float(layer.lipschitz_bound(200).detach())
    assert torch.isfinite(layer.power_iterate).all()
    upper = float(layer.lipschitz_upper_bound())
    assert 0.98 * upper <= sigma <= upper


def test_nonfinite_weights_certify_nothing_and_warn():
    model = trained_cnn()
    x, _ = sample_points(50)
    forged = forged_copy(model, lambda s: s["body.2.weight"].view(-1)[0].fill_(math.inf))
    with pytest.warns(RuntimeWarning, match=r"body\.2 \(Conv2d\).*not finite"):
        assert (forged.certify(x, epsilon=0.0) == 10).all()
    assert (forged.certified_radius(x) == 0).all()


def test_estimate_certifies_where_sound_rejects():
    model = trained_cnn()
    x, _ = sample_points(300)
    sound = model.certified_radius(x)
    estimate = model.certified_radius(x, certificate="estimate")
    gap = estimate - sound
    assert (gap >= 0).all()  # sound is never larger than the estimate
    k = int(torch.argmax(gap))
    assert gap[k] > 0
    eps = float(0.5 * (sound[k] + estimate[k]))
    pred = model.forward_parts(x[k:k + 1]).logits.argmax(1).item()
    assert model.certify(x[k:k + 1], epsilon=eps, certificate="estimate").item() == pred
    assert model.certify(x[k:k + 1], epsilon=eps).item() == 10


def test_margins_within_the_allowance_are_rejected():
    """At the ε where εKD_ji meets the smallest margin (K, D the sound ones), the margin
    clears εK_ji but not εK_ji plus the rounding allowance: rejected."""
    model = trained_cnn()
    x, _ = sample_points(300)
    logits, bounds, allowance = model.sound_forward(x)
    f = logits.double()
    top = f.argmax(1)
    d = bounds.distances.index_select(0, top)
    gap = f.gather(1, top.unsqueeze(1)) - f
    own = torch.nn.functional.one_hot(top, 10).bool()
    eps_star = (gap / (bounds.lipschitz * d)).masked_fill(own, math.inf).amin(1)
    ok = torch.isfinite(eps_star) & (eps_star > 0)
    eps_star, xs = eps_star[ok], x[ok]
    assert len(xs) > 100
    # the allowance at those radii is larger than the 1e-6 relative slack left
    for point, e in zip(xs[:40], eps_star[:40].tolist()):
        eps = e * (1 - 1e-6)
        margin_ok = True  # by construction, gap > εK D_ji for every i ≠ j
        assert margin_ok and model.certify(point.unsqueeze(0), epsilon=eps).item() == 10


def test_sound_bottom_rejects_within_one_ulp_of_the_threshold():
    """SoundBounds.bottom on hand-made float64 logits: a margin exactly at the threshold
    D_01·s1(ε) + s0(ε), and one float64 ulp above it, are rejected (the comparison itself
    rounds against certifying); one 10⁻⁶ above is certified."""
    model = trained_cnn()
    x, _ = sample_points(1)
    _, bounds, allowance = model.sound_forward(x)
    d01 = float(bounds.distances[0, 1])
    eps = 0.1
    thr = d01 * float(allowance.s1 + eps * allowance.s1_slope) + float(allowance.s0 + eps * allowance.s0_slope)
    others = torch.full((1, 8), -1e3, dtype=torch.float64)

    def decide(margin):
        logits = torch.cat([torch.tensor([[margin, 0.0]], dtype=torch.float64), others], dim=1)
        return bool(bounds.bottom(logits, allowance, eps)[1])

    assert not decide(thr)
    assert not decide(math.nextafter(thr, math.inf))
    assert decide(thr * (1 + 1e-6))


def test_autocast_never_enlarges_radii():
    model = trained_cnn()
    x, _ = sample_points(100)
    radius = model.certified_radius(x)
    pred = model.certify(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.certified_radius(x), radius)
        assert torch.equal(model.certify(x), pred)
        assert torch.equal(model.certified_radius(x, certificate="estimate"),
                           copy.deepcopy(model).certified_radius(x, certificate="estimate"))


@pytest.mark.parametrize("precision", ["medium", "high"])
def test_reduced_float32_matmul_precision_is_lifted_while_certifying(precision):
    """A user's ``set_float32_matmul_precision`` below "highest" (oneDNN may then compute
    float32 products in bfloat16) is lifted inside the certifying pass and restored after."""
    model = trained_cnn()
    x, _ = sample_points(100)
    radius, pred = model.certified_radius(x), model.certify(x)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert torch.equal(model.certified_radius(x), radius)
        assert torch.equal(model.certify(x), pred)
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)


def test_bfloat16_model_certifies_nothing():
    """γ_n for bfloat16 at these fan-ins exceeds ½: the rounding cannot be bounded, so the
    sound certificate refuses everything (with a warning)."""
    model = copy.deepcopy(trained_cnn()).to(torch.bfloat16)
    x, _ = sample_points(20)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        assert (model.certify(x.to(torch.bfloat16), epsilon=0.0) == 10).all()
