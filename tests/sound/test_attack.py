"""Sound certificates of trained networks checked by attack: l2 PGD and random directions
at 0.999 × the sound radius never change a certified prediction (of the network evaluated
in its own dtype), while the same attack breaks a radius inflated 20×. Two networks: a
float32 conv net and a float64 dense one, both trained on the real MNIST sample."""
from __future__ import annotations

import pytest
import torch

from tests.sound.sound_fixtures import sample_points, trained_cnn, trained_dense

MODELS = {"cnn-float32": trained_cnn, "dense-float64": trained_dense}


def predict(model, x):
    with torch.no_grad():
        return model.forward_parts(x, certificate="sound").logits.argmax(dim=1)


def pgd(model, x, label, radius, steps=50):
    """l2 PGD maximising the best rival logit minus the label's, inside ‖δ‖ ≤ radius."""
    delta = torch.zeros_like(x)
    r = radius.view(-1, 1, 1, 1).to(x.dtype)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model.forward_parts(x + delta, certificate="sound").logits
        own = logits.gather(1, label.unsqueeze(1)).squeeze(1)
        rival = logits.masked_fill(torch.nn.functional.one_hot(label, 10).bool(), -torch.inf).amax(1)
        grad, = torch.autograd.grad((rival - own).sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
            delta = delta + 0.1 * r * g
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(r / norms.clamp_min(1e-30), max=1.0)
    return delta.detach()


def certified_points(name):
    model = MODELS[name]()
    x, _ = sample_points(300)
    x = x.to(model.head.weight.dtype)
    pred = model.certify(x)
    radius = model.certified_radius(x)
    keep = pred < 10
    assert int(keep.sum()) >= 100
    return model, x[keep], pred[keep], radius[keep]


@pytest.mark.parametrize("name", MODELS)
def test_pgd_below_sound_radius_never_flips(name):
    model, x, pred, radius = certified_points(name)
    delta = pgd(model, x, pred, 0.999 * radius)
    assert (delta.flatten(1).norm(dim=1).double() <= radius * (1 + 1e-6)).all()
    assert torch.equal(predict(model, x + delta), pred)


@pytest.mark.parametrize("name", MODELS)
def test_random_directions_below_sound_radius_never_flip(name):
    model, x, pred, radius = certified_points(name)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        d = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (0.999 * radius).to(x.dtype).view(-1, 1, 1, 1)
        assert torch.equal(predict(model, x + d), pred)


@pytest.mark.parametrize("name", MODELS)
def test_pgd_breaks_an_inflated_radius(name):
    model, x, pred, radius = certified_points(name)
    delta = pgd(model, x, pred, 20 * radius)
    flipped = predict(model, x + delta) != pred
    assert int(flipped.sum()) > len(pred) // 2
