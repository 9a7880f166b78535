"""A full GloRo training step — forward (power iteration, class distances, ⊥ logit), TRADES
loss, backward, Adam — captured once in a CUDA graph with the default backend and replayed:
every replay equals the same step run eagerly."""
from __future__ import annotations

import copy

import torch

import gloro_fast as gf
from gloro_fast import nn as gnn
from gloro_fast.ops import get_backend
from tests.gpu.gpu_env import CUDA, requires_cuda

pytestmark = requires_cuda


def _model():
    torch.manual_seed(0)
    body = gnn.Sequential(
        gnn.Conv2d(1, 16, 4, stride=2, padding="same"), gnn.MinMax(),
        gnn.Conv2d(16, 32, 4, stride=2, padding="same"), gnn.MinMax(),
        gnn.Flatten(), gnn.Linear(32 * 7 * 7, 100), gnn.MinMax(),
    )
    return gf.GloroNet(body, gnn.Linear(100, 10), epsilon=0.3, input_shape=(1, 28, 28)).to(CUDA)


def _batches(n, b=64):
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(b, 1, 28, 28, generator=g).to(CUDA), torch.randint(0, 10, (b,), generator=g).to(CUDA))
            for _ in range(n)]


def _step(model, opt, x, y):
    out = model.forward_parts(x)
    loss = gf.losses.trades_loss(out.augmented, y, lam=1.0)
    loss.backward()
    opt.step()
    return loss


def test_captured_training_step_equals_eager():
    assert get_backend() == "auto"  # the default: Triton kernels on CUDA tensors
    graphed, eager = _model(), None
    eager = copy.deepcopy(graphed)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    batches = _batches(8)
    # warm-up (autotuning, caches, optimizer state) on a side stream, as torch.cuda.graphs asks
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            opt_g.zero_grad(set_to_none=True)
            _step(graphed, opt_g, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        opt_e.zero_grad(set_to_none=True)
        _step(eager, opt_e, x, y)
    static_x, static_y = batches[3][0].clone(), batches[3][1].clone()
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_g, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        opt_e.zero_grad(set_to_none=False)
        loss = _step(eager, opt_e, x, y)
        # the same kernels in the same order; Triton's ∂D scatter is a float atomic (rows
        # sharing a cell sum in a run-dependent order), hence not bitwise
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
        for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
        for (n, b), c in zip(eager.named_buffers(), graphed.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)
