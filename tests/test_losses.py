"""GloRo losses against their formulas, computed independently (explicit probabilities,
per-sample loops), values and gradients, in float64; and their argument checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gloro_fast import losses
from gloro_fast.losses import emma_loss, gloro_cross_entropy, margin_loss, trades_loss

DT = torch.float64


def make(B=9, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = (2 * torch.randn(B, C, generator=g, dtype=DT)).requires_grad_()
    bottom = (f.detach().max(dim=1).values + torch.randn(B, generator=g, dtype=DT)).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    w = torch.randn(C, 4, generator=g, dtype=DT)
    K = 1.7
    kji = (K * torch.cdist(w, w)).fill_diagonal_(0.0).requires_grad_()
    return f, bottom, y, kji


def augment(f, bottom):
    return torch.cat([f, bottom.unsqueeze(1)], dim=1)


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


# --------------------------------------------------------------------------- gloro CE
def test_gloro_cross_entropy_value_and_grad():
    f, bottom, y, _ = make()
    aug = augment(f, bottom)
    got = gloro_cross_entropy(aug, y)
    # −log softmax_y over C + 1 logits, per sample
    expect = sum(-(aug[b, y[b]] - torch.logsumexp(aug[b], 0)) for b in range(len(y))) / len(y)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, F.cross_entropy(aug, y), rtol=1e-12, atol=1e-12)
    g1 = grads(got, f, bottom)
    g2 = grads(expect, f, bottom)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the gradient on the ⊥ logit is softmax_⊥ / B (it is never the label)
    p = torch.softmax(aug.detach(), dim=1)
    torch.testing.assert_close(g1[1], p[:, -1] / len(y), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------- TRADES
def trades_kl_reference(aug, y, lam):
    C = aug.shape[1] - 1
    f = aug[:, :C]
    p = torch.cat([torch.softmax(f, dim=1), torch.zeros(len(y), 1, dtype=aug.dtype)], dim=1)
    q = torch.softmax(aug, dim=1)
    total = 0.0
    for b in range(len(y)):
        kl = sum(p[b, i] * (torch.log(p[b, i]) - torch.log(q[b, i])) for i in range(C + 1) if p[b, i] > 0)
        total = total + kl
    return F.cross_entropy(f, y) + lam * total / len(y)


def trades_ce_reference(aug, y, lam):
    C = aug.shape[1] - 1
    f = aug[:, :C]
    p = torch.softmax(f, dim=1)
    q = torch.softmax(aug, dim=1)
    total = 0.0
    for b in range(len(y)):
        total = total - sum(p[b, i] * torch.log(q[b, i]) for i in range(C))
    return F.cross_entropy(f, y) + lam * total / len(y)


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.5])
@pytest.mark.parametrize("form", ["kl", "ce"])
def test_trades_value_and_grad(lam, form):
    f, bottom, y, _ = make(seed=int(lam * 10))
    aug = augment(f, bottom)
    got = trades_loss(aug, y, lam=lam, form=form)
    ref = trades_kl_reference if form == "kl" else trades_ce_reference
    expect = ref(aug, y, lam)
    torch.testing.assert_close(got, expect, rtol=1e-11, atol=1e-12)
    for a, b in zip(grads(got, f, bottom), grads(expect, f, bottom)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_trades_default_is_kl_lambda_1_and_forms_differ_by_entropy():
    f, bottom, y, _ = make(seed=4)
    aug = augment(f, bottom)
    torch.testing.assert_close(trades_loss(aug, y), trades_kl_reference(aug, y, 1.0), rtol=1e-11, atol=1e-12)
    p = torch.softmax(f, dim=1)
    entropy = -(p * torch.log(p)).sum(dim=1).mean()
    diff = trades_loss(aug, y, 2.0, "ce") - trades_loss(aug, y, 2.0, "kl")
    torch.testing.assert_close(diff, 2.0 * entropy, rtol=1e-10, atol=1e-12)
    # KL ≥ 0, and it is ~0 when f_⊥ is very low
    low = augment(f, torch.full_like(bottom, -1e3))
    torch.testing.assert_close(trades_loss(low, y, 5.0), F.cross_entropy(f, y), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------- EMMA
def emma_reference(f, y, kji, eps):
    """Per-sample, per-rival loop; the scale is a python float (a constant)."""
    B, C = f.shape
    total = 0.0
    for b in range(B):
        yb = int(y[b])
        zs = []
        for i in range(C):
            z = f[b, i] - f[b, yb]
            k = eps * kji[yb, i]
            # K_yy = 0 makes the label's own term 0 (scale taken as 1; it only routes a
            # gradient to the structurally-zero diagonal, which class_distances drops)
            if float(k.detach()) > 0:
                scale = min(max(-float(z.detach()) / float(k.detach()), 0.01), 1.0)
            else:
                scale = 1.0
            zs.append(z + scale * k)
        zs = torch.stack(zs)
        total = total - (zs[yb] - torch.logsumexp(zs, 0))
    return total / B


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 2.0])
def test_emma_value_and_grad(eps):
    f, _, y, kji = make(B=12, seed=7)
    got = emma_loss(f, y, kji, eps)
    expect = emma_reference(f, y, kji, eps)
    torch.testing.assert_close(got, expect, rtol=1e-11, atol=1e-12)
    # gradients equal those of the formula with the scale held constant
    for a, b in zip(grads(got, f, kji), grads(expect, f, kji)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_emma_clipping_regimes():
    """Rivals far below the label use scale 1 (= margin loss), rivals above it 0.01."""
    kji = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.5], [2.0, 1.5, 0.0]], dtype=DT, requires_grad=True)
    y = torch.tensor([0])
    eps = 0.5
    # z_1 = −5 → −z/(εK) = 10 → 1;  z_2 = +1 → negative → 0.01
    f = torch.tensor([[0.0, -5.0, 1.0]], dtype=DT, requires_grad=True)
    got = emma_loss(f, y, kji, eps)
    z = torch.tensor([0.0, -5.0 + 1.0 * 0.5 * 1.0, 1.0 + 0.01 * 0.5 * 2.0], dtype=DT)
    torch.testing.assert_close(got, -(z[0] - torch.logsumexp(z, 0)), rtol=1e-12, atol=1e-12)
    # middle regime: z_1 = −0.25, εK = 0.5 → scale 0.5, z_1 + 0.25 = 0 (pushed onto the boundary)
    f2 = torch.tensor([[0.0, -0.25, -10.0]], dtype=DT)
    z2 = torch.tensor([0.0, 0.0, -10.0 + 1.0], dtype=DT)
    torch.testing.assert_close(emma_loss(f2, y, kji.detach(), eps), -(z2[0] - torch.logsumexp(z2, 0)),
                               rtol=1e-12, atol=1e-12)
    # the scale is detached: d loss / d f_1 is softmax(z)_1 only (no term through the scale)
    g = torch.autograd.grad(emma_loss(f2.requires_grad_(), y, kji.detach(), eps), f2)[0]
    p = torch.softmax(z2, 0)
    torch.testing.assert_close(g[0, 1:], p[1:], rtol=1e-12, atol=1e-14)


def test_emma_eps_zero_is_plain_cross_entropy():
    f, _, y, kji = make(seed=2)
    torch.testing.assert_close(emma_loss(f, y, kji, 0.0), F.cross_entropy(f, y), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- margin
@pytest.mark.parametrize("eps", [0.0, 0.141, 1.58])
def test_margin_loss_value_and_grad(eps):
    f, _, y, kji = make(seed=11)
    got = margin_loss(f, y, kji, eps)
    B, C = f.shape
    total = 0.0
    for b in range(B):
        yb = int(y[b])
        row = torch.stack([f[b, i] + eps * kji[yb, i] for i in range(C)])
        total = total - torch.log_softmax(row, 0)[yb]
    expect = total / B
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got, f, kji), grads(expect, f, kji)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if eps > 0:
        assert float(got.detach()) > float(F.cross_entropy(f, y).detach())


def test_margin_loss_with_gloro_model_output():
    from gloro_fast import GloroNet
    from gloro_fast import nn as gnn
    torch.manual_seed(0)
    net = GloroNet(gnn.Sequential(gnn.Linear(4, 6), gnn.MinMax()), gnn.Linear(6, 3), 0.2).double().eval()
    x, y = torch.randn(5, 4, dtype=DT), torch.tensor([0, 1, 2, 1, 0])
    out = net.forward_parts(x)
    got = margin_loss(out.logits, y, out.margin_lipschitz, 0.2)
    K = net.lipschitz_constant()
    w = net.head.weight.detach()
    gaps = torch.stack([torch.stack([(w[int(t)] - w[i]).norm() for i in range(3)]) for t in y])
    shifted = out.logits + 0.2 * K * gaps
    torch.testing.assert_close(got, F.cross_entropy(shifted, y), rtol=1e-10, atol=1e-12)


def test_losses_registry_names():
    assert set(losses.LOSSES) == {"gloro_ce", "trades", "trades_ce", "emma", "margin"}


# ---------------------------------------------------------------------------- bad input
def test_bad_labels(debug_checks):
    f, bottom, y, kji = make(B=4, C=3)
    aug = augment(f.detach(), bottom.detach())
    f = f.detach()
    for fn in (lambda lab: gloro_cross_entropy(aug, lab), lambda lab: trades_loss(aug, lab),
               lambda lab: emma_loss(f, lab, kji.detach(), 0.1),
               lambda lab: margin_loss(f, lab, kji.detach(), 0.1)):
        with pytest.raises(ValueError, match="labels"):
            fn(torch.tensor([0, 1, 3, 0]))  # 3 == C: ⊥ (or beyond) is never a label
        with pytest.raises(ValueError, match="labels"):
            fn(torch.tensor([0, -1, 2, 0]))
        with pytest.raises(TypeError, match="labels"):
            fn(torch.tensor([0.0, 1.0, 2.0, 0.0]))
        with pytest.raises(TypeError, match="labels"):
            fn(torch.tensor([True, False, True, False]))
        with pytest.raises(ValueError, match="labels"):
            fn(torch.tensor([0, 1, 2]))  # wrong batch
        with pytest.raises(ValueError, match="labels"):
            fn(torch.tensor([[0, 1, 2, 0]]))
        with pytest.raises(TypeError, match="labels"):
            fn([0, 1, 2, 0])


def test_bad_shapes_and_args():
    f, bottom, y, kji = make(B=4, C=3)
    f, kji = f.detach(), kji.detach()
    aug = augment(f, bottom.detach())
    with pytest.raises(ValueError, match="augmented"):
        gloro_cross_entropy(aug[0], y)
    with pytest.raises(ValueError, match="augmented"):
        gloro_cross_entropy(aug[:, :2], y)  # C + 1 must be ≥ 3
    with pytest.raises(TypeError, match="augmented"):
        gloro_cross_entropy(aug.long(), y)
    with pytest.raises(ValueError, match="augmented"):
        trades_loss(aug.unsqueeze(0), y)
    for lam in (-0.1, math.nan, math.inf, "1", None, True):
        with pytest.raises(ValueError, match="lam"):
            trades_loss(aug, y, lam=lam)
    for form in ("KL", "js", None):
        with pytest.raises(ValueError, match="form"):
            trades_loss(aug, y, form=form)
    for fn in (emma_loss, margin_loss):
        with pytest.raises(ValueError, match="margin_lipschitz"):
            fn(f, y, kji[:2, :2], 0.1)
        with pytest.raises(ValueError, match="margin_lipschitz"):
            fn(f, y, kji[0], 0.1)
        with pytest.raises(ValueError, match="logits"):
            fn(f[0], y, kji, 0.1)
        with pytest.raises(ValueError, match="logits"):
            fn(f[:, :1], y, kji[:1, :1], 0.1)
        for eps, exc in ((-0.1, ValueError), (math.nan, ValueError), ("0.1", TypeError)):
            with pytest.raises(exc, match="epsilon"):
                fn(f, y, kji, eps)
