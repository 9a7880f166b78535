"""Sound certificates on CUDA: the float32 model on the GPU decides like the same model on
the CPU (its bounds are computed on the CPU in float64 either way), the rounding allowance
holds against a float64 evaluation on the GPU, certification forces IEEE fp32 (no TF32)
and leaves the global TF32 flags as it found them."""
from __future__ import annotations

import copy

import pytest
import torch

import gloro_fast as gf
from gloro_fast import nn as gnn
from tests.gpu.gpu_env import CUDA, CUDA_BACKENDS, backend, requires_cuda

pytestmark = requires_cuda


def _model():
    torch.manual_seed(0)
    body = gnn.Sequential(
        gnn.Conv2d(1, 8, 4, stride=2, padding="same"), gnn.MinMax(),
        gnn.Conv2d(8, 16, 3, padding="same"), gnn.MinMax(),
        gnn.Flatten(), gnn.Linear(16 * 7 * 7, 64), gnn.MinMax(),
    )
    return gf.GloroNet(body, gnn.Linear(64, 10), epsilon=0.05, input_shape=(1, 14, 14)).eval()


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_sound_decisions_match_cpu(name):
    cpu = _model()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.rand(256, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    want = cpu.certify(x)
    radius = cpu.certified_radius(x)
    with backend(name):
        got = gpu.certify(x.to(CUDA)).cpu()
        got_radius = gpu.certified_radius(x.to(CUDA)).cpu()
    assert gpu.sound_bounds().lipschitz == cpu.sound_bounds().lipschitz
    # the logits round differently on the GPU: decisions may differ only within 1e-4 of ε
    far = (radius - cpu.epsilon).abs() > 1e-4
    assert far.sum() > 200
    assert torch.equal(got[far], want[far])
    torch.testing.assert_close(got_radius, radius, rtol=1e-4, atol=1e-6)


def test_allowance_holds_on_the_gpu():
    model = _model().to(CUDA)
    x = torch.rand(128, 1, 14, 14, generator=torch.Generator().manual_seed(2)).to(CUDA) * 10
    _, _, allowance = model.sound_forward(x)
    reference = copy.deepcopy(model).double()
    _, _, allowance64 = reference.sound_forward(x.double())
    with torch.no_grad():
        err = torch.linalg.vector_norm(model.body(x).double() - reference.body(x.double()), dim=1)
    assert (err <= allowance.body_error + allowance64.body_error).all()


def test_certify_forces_ieee_fp32_and_restores_the_flags():
    model = _model().to(CUDA)
    x = torch.rand(64, 1, 14, 14).to(CUDA)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with_tf32 = model.certify(x)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        without = model.certify(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True  # torch's default
    assert torch.equal(with_tf32, without)


@pytest.mark.parametrize("certificate", ["sound", "estimate"])
def test_edit_behind_the_version_counter_certifies_nothing_until_refreshed(certificate):
    """On the GPU the hot path compares the weights on the device (no host synchronisation):
    an edit through ``.data`` makes the batch certify nothing until a slow-path query
    (here ``lipschitz_constant``) recomputes the bounds."""
    model = _model().to(CUDA)
    x = torch.rand(256, 1, 14, 14, generator=torch.Generator().manual_seed(3)).to(CUDA)
    eps = float(model.certified_radius(x, certificate=certificate).median())
    assert (model.certify(x, epsilon=eps, certificate=certificate) < 10).any()
    model.body[0].weight.data.mul_(1.5)
    assert (model.certify(x, epsilon=eps, certificate=certificate) == 10).all()
    assert (model.certified_radius(x, certificate=certificate) == 0).all()
    model.lipschitz_constant(certificate)
    fresh = copy.deepcopy(model)
    fresh.clear_bound_cache()
    assert torch.equal(model.certify(x, epsilon=eps, certificate=certificate),
                       fresh.certify(x, epsilon=eps, certificate=certificate))
