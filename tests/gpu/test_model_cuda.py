"""GloroNet on CUDA, on each backend that runs there, against the same model on CPU.

The CPU side is the float64 reference backend (the spec); tolerances: float64 1e-9 (different
summation orders); float32 as stated.
"""
from __future__ import annotations

import copy

import pytest
import torch

import gloro_fast as gf
from gloro_fast import models
from gloro_fast import nn as gnn
from gloro_fast.ops import use_backend
from tests.gpu.gpu_env import CUDA, CUDA_BACKENDS, F64, backend, requires_cuda

pytestmark = requires_cuda


def _small(dtype):
    torch.manual_seed(0)
    body = gnn.Sequential(
        gnn.Conv2d(1, 8, 4, stride=2, padding="same"), gnn.MinMax(),
        gnn.Conv2d(8, 16, 3, padding="same"), gnn.MinMax(),
        gnn.Flatten(), gnn.Linear(16 * 7 * 7, 64), gnn.MinMax(),
    )
    return gf.GloroNet(body, gnn.Linear(64, 10), epsilon=0.3, input_shape=(1, 14, 14)).to(dtype)


def _step(model, x, y):
    out = model.forward_parts(x)
    loss = gf.losses.trades_loss(out.augmented, y, lam=1.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out, loss.detach(), grads


def _reference_step(model, x, y):
    with use_backend("reference"):
        return _step(model, x, y)


@pytest.mark.parametrize("name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-9), (torch.float32, 2e-4)])
def test_training_step_matches_cpu(name, dtype, tol):
    """float32: convolutions, GEMMs and kernels of different engines round differently; 2e-4
    relative covers a few ulps through 4 layers and the loss."""
    cpu = _small(dtype)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.rand(32, 1, 14, 14, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    ref_out, ref_loss, ref_grads = _reference_step(cpu, x, y)
    with backend(name):
        out, loss, grads = _step(gpu, x.to(CUDA), y.to(CUDA))
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=tol, atol=tol)
    for n, g in grads.items():
        scale = float(ref_grads[n].abs().max())
        torch.testing.assert_close(g.cpu(), ref_grads[n], rtol=tol * 10, atol=tol * 10 * scale, msg=n)
    for (n, b), c in zip(cpu.named_buffers(), gpu.buffers()):  # the power iterates advanced alike
        torch.testing.assert_close(c.cpu(), b, rtol=tol * 10, atol=tol * 10, msg=n)


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_certify_matches_cpu(name):
    """Eval mode in float64: the certified predictions on CUDA equal those on CPU, except where
    a margin is within 1e-9 of its threshold (where any rounding may decide)."""
    cpu = _small(F64).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.rand(64, 1, 14, 14, generator=torch.Generator().manual_seed(3), dtype=F64)
    with use_backend("reference"):
        want = cpu.certify(x)
        parts = cpu.forward_parts(x)
    with backend(name):
        got = gpu.certify(x.to(CUDA)).cpu()
        torch.testing.assert_close(gpu.lipschitz_constant().cpu(), cpu.lipschitz_constant(), rtol=1e-9, atol=0)
    top = parts.logits.max(dim=1).values
    clear = (top - parts.bottom).abs() > 1e-9
    assert clear.sum() > 32
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_paper_architecture_forward(name):
    """cnn_6C2F (CIFAR-10 shape) training forward on CUDA equals the CPU reference."""
    torch.manual_seed(0)
    cpu = models.cnn_6C2F(input_shape=(3, 32, 32), num_classes=10, epsilon=0.141).double()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.rand(16, 3, 32, 32, dtype=F64)
    with use_backend("reference"):
        want = cpu.forward_parts(x)
    with backend(name):
        got = gpu.forward_parts(x.to(CUDA))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-9)
