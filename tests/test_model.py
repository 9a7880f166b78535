"""GloroNet against independent references: exact norms (SVD of explicit matrices), a
per-sample brute-force ⊥ / certificate / radius loop, and the power-iteration formulas."""
from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from gloro_fast import GloroNet, GloroOutput
from gloro_fast import nn as gnn
from gloro_fast.losses import gloro_cross_entropy
from gloro_fast.nn.base import ConstantLipschitzModule
from gloro_fast.sound.forward_error import affine_layer
from tests.helpers import explicit_matrix, same_conv_reference

DT = torch.float64
TIGHT = dict(tol=1e-13, max_iter=20000)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a thread pool only adds contention (and is very slow when the
    machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- builders
def dense_net(seed=0, d_in=6, hidden=8, classes=4, eps=0.3, bound="margin", head_scale=3.0,
              dtype=DT, **kw):
    """Linear → MinMax → Linear → MinMax body, Kaiming-uniform weights (distinct singular
    values, so the power iteration has real work to do)."""
    torch.manual_seed(seed)
    body = gnn.Sequential(gnn.Linear(d_in, hidden, init="default"), gnn.MinMax(),
                          gnn.Linear(hidden, hidden, init="default"), gnn.MinMax())
    head = gnn.Linear(hidden, classes, init="default")
    with torch.no_grad():
        head.weight.mul_(head_scale)
        head.bias.normal_()
    args = dict(TIGHT)
    args.update(kw)
    return GloroNet(body, head, eps, bound=bound, **args).to(dtype)


CONV_SHAPE = (2, 6, 6)


def conv_net(seed=0, classes=3, eps=0.2, bound="margin", **kw):
    """Tiny conv body: k3 s1 same, k4 s2 same (6→3), k2 s1 same (asymmetric pad), dense."""
    torch.manual_seed(seed)
    body = gnn.Sequential(
        gnn.Conv2d(2, 4, 3, padding="same", init="default"), gnn.MinMax(),
        gnn.Conv2d(4, 4, 4, stride=2, padding="same", init="default"), gnn.MinMax(),
        gnn.Conv2d(4, 2, 2, padding="same", init="default"), gnn.MinMax(),
        gnn.Flatten(), gnn.Linear(18, 6, init="default"), gnn.MinMax(),
    )
    head = gnn.Linear(6, classes, init="default")
    with torch.no_grad():
        head.weight.mul_(3.0)
    args = dict(TIGHT)
    args.update(kw)
    return GloroNet(body, head, eps, bound=bound, input_shape=CONV_SHAPE, **args).to(DT)


# ---------------------------------------------------------------- independent references
def ref_logits(net, x):
    h = x
    with torch.no_grad():
        for layer in net.body:
            if isinstance(layer, gnn.Linear):
                h = h @ layer.weight.t() + layer.bias
            elif isinstance(layer, gnn.Conv2d):
                h = same_conv_reference(layer, h) + layer.bias.view(1, -1, 1, 1)
            elif isinstance(layer, gnn.MinMax):
                a, b = h.chunk(2, dim=1)
                h = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
            elif isinstance(layer, gnn.ReLU):
                h = h.clamp_min(0)
            elif isinstance(layer, gnn.Flatten):
                h = h.reshape(h.shape[0], -1)
            else:  # pragma: no cover
                raise AssertionError(f"no reference for {layer}")
        return h @ net.head.weight.t() + net.head.bias




def exact_layer_norms(net, input_shape=None):
    """Exact operator norm of every linear layer of the body, in order (float64 SVD)."""
    norms = []
    shape = tuple(input_shape) if input_shape is not None else None
    for layer in net.body:
        if isinstance(layer, gnn.Linear):
            norms.append(float(torch.linalg.matrix_norm(layer.weight.detach().to(DT), ord=2)))
        elif isinstance(layer, gnn.Conv2d):
            w = layer.weight.detach().to(DT)

            def op(u, layer=layer, w=w):
                return same_conv_reference(layer, u, w)

            norms.append(float(torch.linalg.matrix_norm(explicit_matrix(op, shape), ord=2)))
        if shape is not None and isinstance(layer, gnn.Conv2d):
            with torch.no_grad():
                shape = tuple(layer(torch.zeros((1,) + shape, dtype=layer.weight.dtype)).shape[1:])
    return norms


def exact_K(net, input_shape=None):
    return math.prod(exact_layer_norms(net, input_shape))


def pair_constants(net, K, bound):
    """K_ji (C, C) as python floats, from the head weight directly."""
    w = net.head.weight.detach().to(DT)
    c = w.shape[0]
    if bound == "global":
        g = math.sqrt(2.0) * K * float(torch.linalg.matrix_norm(w, ord=2))
        return [[0.0 if i == j else g for i in range(c)] for j in range(c)]
    return [[K * float(torch.linalg.vector_norm(w[j] - w[i])) for i in range(c)] for j in range(c)]


def brute(f, kji, eps):
    """Per-sample loop: (j, f_⊥, certified prediction, radius) with python floats."""
    c = f.shape[1]
    js, bottoms, preds, radii = [], [], [], []
    for row in f.tolist():
        top = max(row)
        j = row.index(top)  # lowest index on ties
        rivals = [i for i in range(c) if i != j]
        bottoms.append(max(row[i] + eps * kji[j][i] for i in rivals))
        ok = all(row[j] - row[i] > eps * kji[j][i] for i in rivals)
        preds.append(j if ok else c)
        ratios = []
        for i in rivals:
            gap = row[j] - row[i]
            if kji[j][i] > 0:
                ratios.append(gap / kji[j][i])
            else:
                ratios.append(math.inf if gap > 0 else 0.0)
        radii.append(max(0.0, min(ratios)))
        js.append(j)
    return js, bottoms, preds, radii


def eps_between_radii(radii, lo_frac=0.3, hi_frac=0.7):
    """An ε in the widest gap between sorted finite radii, in the middle of their range,
    so no sample sits on the certification threshold."""
    finite = sorted(r for r in radii if math.isfinite(r) and r > 0)
    lo, hi = int(lo_frac * len(finite)), int(hi_frac * len(finite))
    best = max(range(max(lo, 1), hi), key=lambda k: finite[k] - finite[k - 1])
    assert finite[best] - finite[best - 1] > 1e-6
    return 0.5 * (finite[best] + finite[best - 1])


def buffers(net):
    return {n: b.clone() for n, b in net.named_buffers()}


# ------------------------------------------------------------------------------ forward
# In float64 the sound bounds sit within ~1e-8 of the exact ones (the Cholesky
# certificate's slack and the float64 rounding allowance), so the brute force built from
# the exact norms checks both kinds of certificate; the sound values must lie above.
K_RTOL = {"estimate": 1e-9, "sound": 1e-7}


def check_K(got, K, certificate):
    assert abs(float(got) / K - 1) < K_RTOL[certificate], (float(got), K)
    if certificate == "sound":
        assert float(got) >= K


@pytest.mark.parametrize("certificate", ["estimate", "sound"])
@pytest.mark.parametrize("bound", ["margin", "global"])
@pytest.mark.parametrize("classes", [2, 5])
def test_forward_eval_matches_brute_force(bound, classes, certificate):
    net = dense_net(seed=classes, classes=classes, eps=0.4, bound=bound).eval()
    x = torch.randn(40, 6, dtype=DT)
    parts = net.forward_parts(x, certificate=certificate)
    out = parts.augmented
    assert out.shape == (40, classes + 1) and out.dtype == DT
    f = ref_logits(net, x)
    torch.testing.assert_close(out[:, :classes], f, rtol=1e-12, atol=1e-12)
    K = exact_K(net)
    js, bottoms, _, _ = brute(f, pair_constants(net, K, bound), 0.4)
    torch.testing.assert_close(out[:, classes], torch.tensor(bottoms, dtype=DT), rtol=1e-7, atol=1e-9)
    if certificate == "sound":
        assert (out[:, classes] >= torch.tensor(bottoms, dtype=DT)).all()
        # eval forward is sound by default
        torch.testing.assert_close(net(x), out, rtol=0, atol=0)
    assert isinstance(parts, GloroOutput)
    check_K(parts.lipschitz, K, certificate)


@pytest.mark.parametrize("certificate", ["estimate", "sound"])
def test_forward_conv_body_matches_brute_force(certificate):
    net = conv_net().eval()
    x = torch.randn(16, *CONV_SHAPE, dtype=DT)
    out = net.forward_parts(x, certificate=certificate).augmented
    f = ref_logits(net, x)
    torch.testing.assert_close(out[:, :3], f, rtol=1e-10, atol=1e-12)
    K = exact_K(net, CONV_SHAPE)
    check_K(net.lipschitz_constant(certificate), K, certificate)
    _, bottoms, preds, radii = brute(f, pair_constants(net, K, "margin"), 0.2)
    torch.testing.assert_close(out[:, 3], torch.tensor(bottoms, dtype=DT), rtol=1e-7, atol=1e-9)
    radius = net.certified_radius(x, certificate=certificate)
    torch.testing.assert_close(radius, torch.tensor(radii, dtype=DT), rtol=1e-6, atol=1e-9)
    if certificate == "sound":
        assert (radius <= torch.tensor(radii, dtype=DT)).all()


def test_forward_tie_uses_lowest_index_and_is_bottom():
    """f_0 == f_1 exactly with different head rows (they differ only on a dead unit):
    j must be 0, f_⊥ uses D_0i, and the tie can never be certified."""
    torch.manual_seed(3)
    first = gnn.Linear(6, 8, init="default")
    with torch.no_grad():
        first.bias[0] = -1e3  # unit 0 is dead after the ReLU: h_0 == 0 exactly
    body = gnn.Sequential(first, gnn.ReLU())
    head = gnn.Linear(8, 4, init="default")
    with torch.no_grad():
        head.weight[1] = head.weight[0]
        head.weight[1, 0] += 1.0  # rows 0 and 1 differ only where h is 0
        # row 2: close to row 0 on the live units, far along the dead one, so that
        # D_02 ≈ 3 and D_12 ≈ 4 (j = 0 and j = 1 give different ⊥ logits)
        head.weight[2] = head.weight[0] + 0.01 * torch.randn(8)
        head.weight[2, 0] = head.weight[0, 0] - 3.0
        head.bias[:2] = 10.0  # classes 0 and 1 always on top
        head.bias[2] = 9.5
    net = GloroNet(body, head, 0.5, **TIGHT).to(DT).eval()
    x = torch.randn(20, 6, dtype=DT)
    out = net.forward_parts(x, certificate="estimate").augmented
    assert torch.equal(out[:, 0], out[:, 1])
    f = ref_logits(net, x)
    K = exact_K(net)
    kji = pair_constants(net, K, "margin")
    js, bottoms, preds, radii = brute(f, kji, 0.5)
    assert set(js) == {0}
    torch.testing.assert_close(out[:, 4], torch.tensor(bottoms, dtype=DT), rtol=1e-9, atol=1e-9)
    # with j = 1 instead, f_⊥ would use row D_1·: make sure that differs (the test can fail)
    alt = [max(row[i] + 0.5 * kji[1][i] for i in range(4) if i != 1) for row in f.tolist()]
    assert max(abs(a - b) for a, b in zip(alt, bottoms)) > 1e-3
    for certificate in ("estimate", "sound"):
        assert net.certify(x, certificate=certificate).tolist() == [4] * 20
        assert net.certified_radius(x, certificate=certificate).tolist() == [0.0] * 20
    # the sound ⊥ (default eval forward) sits above the tie too
    assert (net(x).argmax(dim=1) == 4).all() or (net(x)[:, 4] >= net(x)[:, 0]).all()


# ---------------------------------------------------------------------------- certify
@pytest.mark.parametrize("certificate", ["estimate", "sound"])
@pytest.mark.parametrize("bound", ["margin", "global"])
@pytest.mark.parametrize("classes", [2, 6])
def test_certify_and_radius_match_brute_force(bound, classes, certificate):
    net = dense_net(seed=10 + classes, classes=classes, bound=bound).eval()
    x = torch.randn(200, 6, dtype=DT)
    f = ref_logits(net, x)
    K = exact_K(net)
    kji = pair_constants(net, K, bound)
    _, _, _, radii = brute(f, kji, 0.0)
    eps = eps_between_radii(radii)
    net.epsilon = eps
    _, _, preds, radii = brute(f, kji, eps)
    got = net.certify(x, certificate=certificate)
    assert got.dtype == torch.int64 and got.shape == (200,)
    assert got.tolist() == preds
    assert torch.equal(net.certify(x, epsilon=eps, certificate=certificate), got)
    assert 0 < sum(p == classes for p in preds) < 200  # both outcomes present
    radius = net.certified_radius(x, certificate=certificate)
    rtol = 1e-9 if certificate == "estimate" else 1e-6
    torch.testing.assert_close(radius, torch.tensor(radii, dtype=DT), rtol=rtol, atol=1e-12)
    # consistency: certified at ε iff radius > ε, and then the prediction is argmax f
    top = f.argmax(dim=1)
    expect = torch.where(radius > eps, top, torch.full_like(top, classes))
    assert torch.equal(got, expect)
    # forward's augmented argmax agrees with certify (no exact ties here)
    assert torch.equal(net.forward_parts(x, certificate=certificate).augmented.argmax(dim=1), got)


def test_certify_exact_tie_is_bottom_and_eps_zero():
    torch.manual_seed(5)
    body = gnn.Sequential(gnn.Linear(6, 8, init="default"), gnn.MinMax())
    head = gnn.Linear(8, 4, init="default")
    with torch.no_grad():
        head.weight[2] = head.weight[1]
        head.bias[1] = head.bias[2] = 0.3  # the tied pair is on top about half of the time
    for eps in (0.3, 0.0):
        net = GloroNet(body, head, eps, **TIGHT).to(DT).eval()
        x = torch.randn(300, 6, dtype=DT)
        f = ref_logits(net, x)
        logits = net.forward_parts(x).logits
        assert torch.equal(logits[:, 1], logits[:, 2])  # exact ties in the logits
        tied = logits.argmax(dim=1) == 1
        assert 0 < int(tied.sum()) < 300
        got = net.certify(x, certificate="estimate")
        assert (got[tied] == 4).all()
        assert (net.certify(x)[tied] == 4).all()
        assert (net.certified_radius(x, certificate="estimate")[tied] == 0).all()
        assert (net.certified_radius(x)[tied] == 0).all()
        _, _, preds, _ = brute(f, pair_constants(net, exact_K(net), "margin"), eps)
        if eps == 0.0:
            # everything is certified except the exact ties
            assert torch.equal(got, torch.where(tied, torch.full_like(got, 4), f.argmax(dim=1)))
            assert got.tolist() == preds
        else:
            # away from the threshold the brute force decides the rest
            radius = net.certified_radius(x, certificate="estimate")
            far = (radius - eps).abs() > 1e-6
            assert torch.equal(got[far], torch.tensor(preds)[far])


@pytest.mark.parametrize("certificate", ["estimate", "sound"])
def test_certified_points_resist_random_perturbations(certificate):
    net = dense_net(seed=7, classes=3).eval()
    x = torch.randn(64, 6, dtype=DT)
    radius = net.certified_radius(x, certificate=certificate)
    top = net(x)[:, :3].argmax(dim=1)
    ok = radius > 0
    assert ok.any()
    for _ in range(20):
        d = torch.randn_like(x)
        d = d / d.norm(dim=1, keepdim=True) * (0.999 * radius.clamp(max=1e3)).unsqueeze(1)
        moved = ref_logits(net, x + d).argmax(dim=1)
        assert torch.equal(moved[ok], top[ok])


# ------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize("bound", ["margin", "global"])
def test_lipschitz_constant_and_margin_lipschitz_exact(bound):
    net = dense_net(seed=2, classes=5, bound=bound)
    K = exact_K(net)
    got = net.lipschitz_constant("estimate")
    assert got.dim() == 0 and got.dtype == DT and not got.requires_grad
    assert abs(float(got) / K - 1) < 1e-10  # tight tol really converges
    expect = torch.tensor(pair_constants(net, K, bound), dtype=DT)
    for certificate in ("estimate", "sound"):
        ml = net.margin_lipschitz(certificate)
        assert ml.shape == (5, 5) and ml.dtype == DT
        torch.testing.assert_close(ml, expect, rtol=1e-8 if certificate == "sound" else 1e-9, atol=0)
        assert torch.equal(torch.diagonal(ml), torch.zeros(5, dtype=DT))
        if certificate == "sound":
            assert (ml >= expect).all()
    sound = net.lipschitz_constant()  # the default: provable
    assert sound.dim() == 0 and sound.dtype == torch.float64 and not sound.requires_grad
    check_K(sound, K, "sound")


def test_lipschitz_constant_matches_layer_bound_products():
    # each converged layer σ̂ is a lower bound converging to the exact norm
    net = conv_net(seed=4)
    state = buffers(net)
    K = net.lipschitz_constant("estimate")
    exact = exact_layer_norms(net, CONV_SHAPE)
    brackets = [b for b in net.lipschitz_bracket() if b.estimate is not None]
    assert [b.name for b in brackets] == [f"body.{i}" for i in (0, 2, 4, 7)]
    for bracket, norm in zip(brackets, exact):
        assert bracket.estimate <= norm * (1 + 1e-12)
        assert abs(bracket.estimate / norm - 1) < 1e-8
        assert bracket.lower <= norm <= bracket.upper
        assert bracket.upper / bracket.lower - 1 < 1e-6
    assert abs(float(K) / math.prod(b.estimate for b in brackets) - 1) < 1e-12
    # computing the estimate left the model alone (no iterate moved)
    for name, b in net.named_buffers():
        assert torch.equal(b, state[name]), name


def test_unconverged_bound_warns():
    net = dense_net(seed=2, tol=1e-15, max_iter=2)
    with pytest.warns(RuntimeWarning, match="ended 'max_iter' after 2 iterations"):
        net.lipschitz_constant("estimate")


# ------------------------------------------------------------------------- training mode
def power_step_reference(w, u, n):
    for _ in range(n):
        v = w.t() @ (w @ u)
        u = v / v.norm()
    return u


@pytest.mark.parametrize("bound", ["margin", "global"])
@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_training_forward_uses_sigma_hat_and_iterates(bound, n_iter):
    net = dense_net(seed=1, classes=4, bound=bound, n_iter=n_iter, eps=0.5).train()
    linears = [net.body[0], net.body[2]]
    before = [m.power_iterate.clone() for m in linears]
    head_before = net.head.power_iterate.clone()
    x = torch.randn(12, 6, dtype=DT)
    parts = net.forward_parts(x)
    sigmas = []
    for m, u0 in zip(linears, before):
        w = m.weight.detach()
        u = power_step_reference(w, u0, n_iter)
        torch.testing.assert_close(m.power_iterate, u, rtol=1e-12, atol=1e-14)
        assert torch.equal(m.power_iterate, u0) == (n_iter == 0)
        sigmas.append(float((w @ u).norm()))
    K_hat = math.prod(sigmas)
    assert abs(float(parts.lipschitz.detach()) / K_hat - 1) < 1e-12
    assert parts.lipschitz.requires_grad
    if bound == "global":
        u = power_step_reference(net.head.weight.detach(), head_before, n_iter)
        torch.testing.assert_close(net.head.power_iterate, u, rtol=1e-12, atol=1e-14)
        s_head = float((net.head.weight.detach() @ u).norm())
        kji = [[0.0 if i == j else math.sqrt(2) * K_hat * s_head for i in range(4)] for j in range(4)]
    else:
        assert torch.equal(net.head.power_iterate, head_before)  # the head is not iterated
        kji = pair_constants(net, K_hat, "margin")
    if n_iter > 0:
        # σ̂ after a few steps from a random start is not yet the exact norm
        assert abs(K_hat / exact_K(net) - 1) > 1e-6
    f = ref_logits(net, x)
    _, bottoms, _, _ = brute(f, kji, 0.5)
    torch.testing.assert_close(parts.bottom, torch.tensor(bottoms, dtype=DT), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(net(x)[:, :4], f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bound", ["margin", "global"])
def test_training_output_differentiable_through_K(bound):
    net = dense_net(seed=1, classes=4, bound=bound, eps=0.5).train()
    x = torch.randn(12, 6, dtype=DT)
    y = torch.randint(0, 4, (12,))
    loss = gloro_cross_entropy(net(x), y)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # dK/dW_l = (K/σ_l) (W_l u_l) u_lᵀ / σ_l, with u_l the stored iterate
    net.zero_grad()
    parts = net.forward_parts(x)
    linears = [net.body[0], net.body[2]]
    grads = torch.autograd.grad(parts.lipschitz, [m.weight for m in linears], retain_graph=True)
    sigmas = [float((m.weight.detach() @ m.power_iterate).norm()) for m in linears]
    K = math.prod(sigmas)
    for m, s, g in zip(linears, sigmas, grads):
        u = m.power_iterate
        expect = (K / s) * torch.outer(m.weight.detach() @ u, u) / s
        torch.testing.assert_close(g, expect, rtol=1e-10, atol=1e-12)
    # the ⊥ logit's gradient w.r.t. a body weight includes the K path: it differs from the
    # gradient with K held constant
    g_full = torch.autograd.grad(parts.bottom.sum(), net.body[0].weight, retain_graph=True)[0]
    from gloro_fast.ops import bottom_logit
    b_const, _ = bottom_logit(parts.logits, parts.distances, parts.lipschitz.detach(), net.epsilon)
    g_const = torch.autograd.grad(b_const.sum(), net.body[0].weight)[0]
    assert (g_full - g_const).abs().max() > 1e-6


@pytest.mark.parametrize("certificate", ["estimate", "sound"])
def test_eval_forward_uses_converged_bounds(certificate):
    net = dense_net(seed=8).eval()
    parts = net.forward_parts(torch.randn(3, 6, dtype=DT), certificate=certificate)
    check_K(parts.lipschitz, exact_K(net), certificate)
    # converged= overrides the mode
    net.train()
    parts = net.forward_parts(torch.randn(3, 6, dtype=DT), converged=True, certificate=certificate)
    check_K(parts.lipschitz, exact_K(net), certificate)


# ------------------------------------------------------------------------------- cache
def assert_bound_fresh(net, input_shape=None, rtol=1e-9):
    """Both kinds of bound match the current weights (estimate: to ``rtol``; sound: above
    the exact value and within 1e-7 of it)."""
    K = exact_K(net, input_shape)
    expect = torch.tensor(pair_constants(net, K, net.bound), dtype=DT)
    got = net.lipschitz_constant("estimate")
    assert got.dtype == net.head.weight.dtype
    assert abs(float(got) / K - 1) < rtol, (float(got), K)
    torch.testing.assert_close(net.margin_lipschitz("estimate").to(DT), expect, rtol=rtol * 10, atol=0)
    sound = net.lipschitz_constant()
    assert sound.dtype == torch.float64
    check_K(sound, K, "sound")
    torch.testing.assert_close(net.margin_lipschitz(), expect, rtol=1e-6, atol=0)
    return K


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("bound", ["margin", "global"])
def test_cache_refreshes_after_optimizer_step(opt, bound):
    net = dense_net(seed=3, bound=bound)
    K0 = assert_bound_fresh(net)
    ml0 = net.margin_lipschitz().clone()
    optim = (torch.optim.SGD(net.parameters(), lr=0.5) if opt == "sgd"
             else torch.optim.Adam(net.parameters(), lr=0.05))
    net.train()
    x, y = torch.randn(16, 6, dtype=DT), torch.randint(0, 4, (16,))
    gloro_cross_entropy(net(x), y).backward()
    optim.step()
    K1 = assert_bound_fresh(net)
    assert abs(K1 / K0 - 1) > 1e-3
    assert (net.margin_lipschitz() - ml0).abs().max() > 1e-3


def test_cache_refreshes_after_load_state_dict():
    a, b = dense_net(seed=1), dense_net(seed=2)
    Ka = assert_bound_fresh(a)
    a.load_state_dict(b.state_dict())
    Kb = assert_bound_fresh(a)
    assert abs(Kb / Ka - 1) > 1e-3


@pytest.mark.parametrize("how", ["no_grad", "data", "head", "set_data"])
def test_cache_refreshes_after_inplace_edit(how):
    net = dense_net(seed=4)
    K0 = assert_bound_fresh(net)
    ml0 = net.margin_lipschitz().clone()
    w = net.body[0].weight
    if how == "no_grad":
        with torch.no_grad():
            w.mul_(1.7)
    elif how == "data":
        w.data.mul_(1.7)  # bypasses the version counter
    elif how == "head":
        with torch.no_grad():
            net.head.weight[0].add_(1.0)
    else:
        w.data = w.data * 1.7
    assert_bound_fresh(net)
    if how == "head":
        assert (net.margin_lipschitz() - ml0).abs().max() > 1e-3
    else:
        assert abs(float(net.lipschitz_constant("estimate")) / K0 - 1.7) < 1e-6
        assert abs(float(net.lipschitz_constant()) / K0 - 1.7) < 1e-6


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_edit_behind_the_version_counter_never_meets_the_cached_bound(certificate):
    """An in-place edit through ``.data`` leaves the cache key unchanged. On the CPU the hot
    path compares the weights on the host (there is no device to wait for) and recomputes at
    once: certification is that of the edited network. (On an accelerator it certifies
    nothing until a slow-path query recomputes: tests/gpu/test_sound_cuda.py, and the
    compiled graph in tests/test_hot_path.py.)"""
    net = dense_net(seed=4, eps=0.05).eval()
    x = torch.randn(50, 6, dtype=DT)
    before = net.certify(x, certificate=certificate)
    assert (before < 4).sum() > 10
    net.body[0].weight.data.mul_(1.5)
    fresh = copy.deepcopy(net)
    fresh.clear_bound_cache()
    after = net.certify(x, certificate=certificate)
    assert torch.equal(after, fresh.certify(x, certificate=certificate))
    assert not torch.equal(after, before)
    assert torch.equal(net.certified_radius(x, certificate=certificate),
                       fresh.certified_radius(x, certificate=certificate))
    check_K(net.lipschitz_constant(certificate), exact_K(net), certificate)


class _Scale(ConstantLipschitzModule):
    """x ↦ c·x, parameterless: its constant is a setting, not a weight."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    @property
    def lipschitz_constant_value(self):
        return self.c

    def forward(self, x):
        return x * self.c

    def forward_bound(self, bound, arith, upper_of):
        c = upper_of(self)   # one product per entry, no sum
        return affine_layer(bound, bound.shape, c, c, 1, 0.0, arith, additions=0)


class _Unbounded(ConstantLipschitzModule):
    lipschitz_constant_value = 2.0

    def forward(self, x):
        return 2 * x


def _pool_net(pool):
    torch.manual_seed(0)
    body = gnn.Sequential(gnn.Conv2d(1, 4, 3, padding=1), gnn.MinMax(), pool, gnn.Flatten(),
                          gnn.Linear(64, 8), gnn.MinMax())
    return GloroNet(body, gnn.Linear(8, 3), epsilon=0.05, input_shape=(1, 8, 8)).eval()


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_a_parameterless_layer_swapped_after_caching_never_meets_the_old_bound(certificate):
    """Swapping an average pool (constant 1/2) for a max pool (1) changes no parameter, yet
    doubles the network's Lipschitz constant: the cached bounds must go (they are keyed on
    the modules and their settings too; before, the halved K stayed and certified points
    the network's own bounds do not)."""
    net = _pool_net(gnn.AvgPool2d(2))
    x = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    k_avg = float(net.lipschitz_constant(certificate))
    net.certify(x, certificate=certificate)
    net.body[2] = gnn.MaxPool2d(2)
    fresh = _pool_net(gnn.MaxPool2d(2))
    assert float(net.lipschitz_constant(certificate)) == pytest.approx(2 * k_avg, rel=1e-6)
    expected = fresh.certify(x, certificate=certificate)
    assert (expected < 3).any() and (expected == 3).any()
    assert torch.equal(net.certify(x, certificate=certificate), expected)
    assert torch.equal(net.certified_radius(x, certificate=certificate),
                       fresh.certified_radius(x, certificate=certificate))


def test_a_layer_setting_edited_in_place_never_meets_the_old_bound():
    net = dense_net(seed=4, eps=0.05).eval()
    net.body = gnn.Sequential(*net.body, _Scale(1.0))
    x = torch.randn(50, 6, dtype=DT)
    k1 = float(net.lipschitz_constant())
    before = net.certify(x)
    net.body[-1].c = 3.0               # no parameter changes
    assert float(net.lipschitz_constant()) == pytest.approx(3 * k1, rel=1e-9)
    fresh = copy.deepcopy(net)
    fresh.clear_bound_cache()
    assert torch.equal(net.certify(x), fresh.certify(x))
    assert not torch.equal(net.certify(x), before)
    # a constant layer that does not say how its constant enters the bound certifies nothing
    with pytest.raises(NotImplementedError, match="forward_bound"):
        gf_net = GloroNet(gnn.Sequential(gnn.Linear(6, 4), _Unbounded()), gnn.Linear(4, 3), epsilon=0.1)
        gf_net.certify(torch.randn(2, 6))
    # a setting that is not plain (a tuple holding a tensor) is not part of the key, and
    # comparing keys never compares tensors elementwise
    net.body[-1].extras = (torch.ones(3), 2)
    first = net.certify(x)
    net.body[-1].extras = (torch.ones(3), 2)     # new objects: == would be elementwise
    assert torch.equal(net.certify(x), first)
    # what does not change the network keeps the bounds: mode switches, the radius
    sb = net.sound_bounds()
    net.train(), net.eval()
    net.epsilon = 0.2
    assert net.sound_bounds() is sb


def test_copies_of_a_network_start_with_an_empty_cache():
    """deepcopy, pickling and torch.save carry no cached bound and no weight snapshot: the
    copy's parameters live elsewhere (the key could not match) and the snapshot would double
    what is saved. The copy certifies as the original does."""
    net = dense_net(seed=4, eps=0.05).eval()
    x = torch.randn(50, 6, dtype=DT)
    expected = net.certify(x)
    assert net.__dict__["_bound_cache"].values
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)), loaded):
        cache = copied.__dict__["_bound_cache"]
        assert cache.values == {} and cache._snapshot == [] and cache._key is None
        assert torch.equal(copied.certify(x), expected)
    # what remains is the parameters and the pickled structure, not a second copy of them
    big = GloroNet(gnn.Sequential(gnn.Linear(512, 512), gnn.MinMax()), gnn.Linear(512, 10), epsilon=0.1)
    big.sound_bounds()
    buf = io.BytesIO()
    torch.save(big, buf)
    assert buf.tell() < 1.2 * sum(p.numel() * p.element_size() for p in big.parameters())


def test_cache_refreshes_after_double():
    net = dense_net(seed=6, dtype=torch.float32, tol=1e-5, max_iter=1000)
    k32 = net.lipschitz_constant("estimate")
    assert k32.dtype == torch.float32
    s32 = net.sound_bounds()
    assert s32.dtype == torch.float32
    net.double()
    net.tol = 1e-13
    net.max_iter = 20000
    assert_bound_fresh(net, rtol=1e-10)
    assert net.sound_bounds().dtype == DT
    # the float32 forward needed a larger rounding allowance than the float64 one
    assert net.sound_bounds().body_error.a < s32.body_error.a * 1e-6
    assert net(torch.randn(2, 6, dtype=DT)).dtype == DT


def test_certify_twice_does_not_iterate_again(monkeypatch):
    net = dense_net(seed=9).eval()
    x = torch.randn(10, 6, dtype=DT)
    first = net.certify(x, certificate="estimate")
    radius = net.certified_radius(x, certificate="estimate")
    state = buffers(net)
    calls = []
    for m in net.modules():
        if isinstance(m, gnn.PowerIterationModule):
            orig = m.converge
            monkeypatch.setattr(m, "converge", lambda *a, _o=orig, **k: calls.append(1) or _o(*a, **k))
    assert torch.equal(net.certify(x, certificate="estimate"), first)
    assert torch.equal(net.certified_radius(x, certificate="estimate"), radius)
    net.forward_parts(x, certificate="estimate")
    net.lipschitz_constant("estimate")
    assert calls == []
    for name, b in net.named_buffers():
        assert torch.equal(b, state[name]), name
    # ... but after a change it does iterate again
    with torch.no_grad():
        net.body[2].weight.mul_(0.9)
    net.certify(x, certificate="estimate")
    assert len(calls) > 0


def test_sound_bounds_computed_once_per_weights(monkeypatch):
    net = dense_net(seed=9).eval()
    x = torch.randn(10, 6, dtype=DT)
    calls = []
    for m in net.modules():
        if isinstance(m, gnn.Linear):
            orig = m.lipschitz_upper_bound
            monkeypatch.setattr(m, "lipschitz_upper_bound", lambda _o=orig: calls.append(1) or _o())
    first = net.certify(x)
    n = len(calls)
    assert n == 3  # two body layers and the head
    state = buffers(net)
    assert torch.equal(net.certify(x), first)
    net.certified_radius(x)
    net(x)
    net.lipschitz_constant()
    net.margin_lipschitz()
    assert len(calls) == n
    # sound certification neither reads nor moves the power iterates
    for name, b in net.named_buffers():
        assert torch.equal(b, state[name]), name
    with torch.no_grad():
        net.body[2].weight.mul_(0.9)
    net.certify(x)
    assert len(calls) == 2 * n


# -------------------------------------------------------------------------- state dict
def test_state_dict_round_trip_dense():
    a = dense_net(seed=11, classes=5, eps=0.2)
    x = torch.randn(50, 6, dtype=DT)
    sd = a.state_dict()
    assert any(k.endswith("power_iterate") for k in sd)
    b = dense_net(seed=12, classes=5, eps=0.2)
    b.load_state_dict(sd)
    assert torch.equal(a.certify(x), b.certify(x))
    assert torch.equal(a.certified_radius(x), b.certified_radius(x))
    assert torch.equal(a.eval()(x), b.eval()(x))
    # saving after certification: the loaded model agrees to within the tolerance
    c = dense_net(seed=13, classes=5, eps=0.2)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.certified_radius(x), a.certified_radius(x), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_cnn_2C2F():
    from gloro_fast import models
    torch.manual_seed(0)
    a = models.cnn_2C2F(tol=1e-5)
    torch.manual_seed(1)
    b = models.cnn_2C2F(tol=1e-5)
    x = torch.rand(4, 1, 28, 28)
    sd = a.state_dict()
    b.load_state_dict(sd)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    ca, cb = a.certify(x), b.certify(x)
    assert torch.equal(ca, cb)
    assert torch.equal(a.certified_radius(x), b.certified_radius(x))
    assert float(a.certified_radius(x).max()) >= 0


# -------------------------------------------------------------------------- bad inputs
def small_body():
    return gnn.Sequential(gnn.Linear(6, 8), gnn.MinMax())


@pytest.mark.parametrize("method", ["forward", "certify", "certified_radius"])
def test_bad_x(method, debug_checks):
    net = dense_net(seed=0).eval()
    call = getattr(net, method) if method != "forward" else net
    call(torch.randn(2, 6, dtype=DT))  # learns the input shape
    bad = [
        (torch.randn(2, 7, dtype=DT), ValueError),
        (torch.randn(2, 6, 1, dtype=DT), ValueError),
        (torch.randn(6, dtype=DT), ValueError),
        (torch.ones(2, 6, dtype=torch.int64), TypeError),
        (torch.randn(2, 6, dtype=torch.float32), TypeError),
        (torch.tensor([[0.0] * 5 + [math.nan]] * 2, dtype=DT), ValueError),
        (torch.tensor([[0.0] * 5 + [math.inf]] * 2, dtype=DT), ValueError),
        ([[0.0] * 6], TypeError),
    ]
    for x, exc in bad:
        with pytest.raises(exc, match=r"\bx\b"):
            call(x)


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_x_is_checked_before_any_bound_is_computed(certificate, monkeypatch):
    """A bad input fails at once, with its message, before seconds of bound computation."""
    import gloro_fast.bound_cache as bound_cache

    net = conv_net(seed=1).eval()
    computed = []
    for name in ("compute_estimate", "compute_sound", "upper_bounds"):
        monkeypatch.setattr(bound_cache, name, lambda *a, _n=name: computed.append(_n))
    with pytest.raises(TypeError, match=r"\bx\b.*dtype"):
        net.certify(torch.rand((3,) + CONV_SHAPE, dtype=torch.float32), certificate=certificate)
    with pytest.raises(ValueError, match=r"\bx\b"):
        net.certify(torch.rand(3, 2, 5, 6, dtype=DT), certificate=certificate)
    assert computed == []


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_nonfinite_x_without_debug_is_never_certified(certificate):
    """Outside debug mode NaN/Inf inputs raise nothing (no host synchronisation): they are
    simply not certified, with radius 0, and the others in the batch are unaffected."""
    net = dense_net(seed=0, eps=0.01).eval()
    x = torch.randn(6, 6, dtype=DT)
    clean = net.certify(x, certificate=certificate)
    x[1, 2], x[3, 0] = math.nan, math.inf
    got = net.certify(x, certificate=certificate)
    assert got[1] == 4 and got[3] == 4
    keep = [0, 2, 4, 5]
    assert torch.equal(got[keep], clean[keep])
    radius = net.certified_radius(x, certificate=certificate)
    assert radius[1] == 0 and radius[3] == 0
    augmented = net.forward_parts(x, certificate=certificate).augmented
    assert augmented.shape == (6, 5)


def test_bad_x_shape_with_input_shape():
    net = conv_net()
    with pytest.raises(ValueError, match=r"\bx\b"):
        net(torch.randn(2, 2, 6, 5, dtype=DT))
    with pytest.raises(ValueError, match=r"\bx\b"):
        net.certify(torch.randn(2, 3, 6, 6, dtype=DT))


@pytest.mark.parametrize("eps,exc", [(-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                     ("0.3", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_epsilon(eps, exc):
    with pytest.raises(exc, match="epsilon"):
        GloroNet(small_body(), gnn.Linear(8, 3), eps)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(bound="foo"), ValueError, "bound"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=1.0), ValueError, "tol"),
    (dict(tol=-1e-3), ValueError, "tol"),
    (dict(tol=math.nan), ValueError, "tol"),
    (dict(n_iter=-1), ValueError, "n_iter"),
    (dict(n_iter=1.5), TypeError, "n_iter"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(input_shape=(2, 6)), ValueError, "input_shape"),
])
def test_bad_constructor_args(kw, exc, name):
    with pytest.raises(exc, match=name):
        GloroNet(small_body(), gnn.Linear(8, 3), 0.1, **kw)


def test_bad_body_and_head():
    with pytest.raises(ValueError, match="head"):
        GloroNet(small_body(), gnn.Linear(8, 1), 0.1)
    with pytest.raises(ValueError, match="head"):
        GloroNet(small_body(), torch.nn.Linear(8, 1), 0.1)
    with pytest.raises(TypeError, match="head"):
        GloroNet(small_body(), torch.nn.Conv2d(8, 3, 1), 0.1)
    with pytest.raises(TypeError, match="BatchNorm1d"):
        GloroNet(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8)), gnn.Linear(8, 3), 0.1)
    with pytest.raises(TypeError, match="BatchNorm1d"):
        GloroNet(gnn.Sequential(gnn.Linear(6, 8), torch.nn.BatchNorm1d(8)), gnn.Linear(8, 3), 0.1)
    with pytest.raises(TypeError, match="body"):
        GloroNet("not a module", gnn.Linear(8, 3), 0.1)


def test_torch_layers_are_converted():
    torch.manual_seed(0)
    tb = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())
    th = torch.nn.Linear(8, 3)
    net = GloroNet(tb, th, 0.1, **TIGHT).to(DT).eval()
    assert isinstance(net.head, gnn.Linear) and isinstance(net.body, gnn.Sequential)
    torch.testing.assert_close(net.head.weight, th.weight.to(DT))
    x = torch.randn(5, 6, dtype=DT)
    expect = F.linear(torch.relu(F.linear(x, tb[0].weight.to(DT), tb[0].bias.to(DT))), th.weight.to(DT), th.bias.to(DT))
    torch.testing.assert_close(net(x)[:, :3], expect)
    assert abs(float(net.lipschitz_constant()) / exact_K(net) - 1) < 1e-9


def test_empty_batch():
    net = dense_net(seed=0).eval()
    x = torch.zeros(0, 6, dtype=DT)
    assert net(x).shape == (0, 5)
    c = net.certify(x)
    assert c.shape == (0,) and c.dtype == torch.int64
    assert net.certified_radius(x).shape == (0,)
    net.train()
    assert net(x).shape == (0, 5)
