"""Dispatch to the Triton kernels: picked for CUDA tensors, never for CPU tensors unless
asked (the interpreter is a test tool), and equal to the reference through the public ops."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_usable")

from gloro_fast import ops  # noqa: E402

F64 = torch.float64


def test_auto_never_picks_triton_for_cpu_tensors():
    with ops.use_backend("auto"):
        assert ops.resolve_backend(torch.device("cpu"), op="class_distances") in ("cpp", "reference")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors():
    with ops.use_backend("auto"):
        assert ops.resolve_backend(torch.device("cuda"), op="bottom_logit") == "triton"


def test_public_ops_run_triton_and_match_reference(device, gen, monkeypatch):
    import gloro_fast.kernels.bottom_logit as bl

    w = torch.randn(7, 5, generator=gen, dtype=F64).to(device).requires_grad_()
    f = torch.randn(4, 7, generator=gen, dtype=F64).to(device).requires_grad_()
    k = torch.tensor(1.3, dtype=F64, device=device)
    calls = []
    original = bl.forward_kernel
    monkeypatch.setattr(bl, "forward_kernel", lambda block_c: calls.append(block_c) or original(block_c))

    def run():
        d = ops.class_distances(w)
        bottom, i_star = ops.bottom_logit(f, d, k, 0.2)
        bottom.sum().backward()
        out = (d.detach(), bottom.detach(), i_star, w.grad.clone(), f.grad.clone())
        w.grad = f.grad = None
        return out

    with ops.use_backend("triton"):
        assert ops.resolve_backend(device, "bottom_logit") == "triton"
        got = run()
    assert calls, "the public op did not dispatch to the Triton kernel"
    with ops.use_backend("reference"):
        want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_power_iteration_ops_dispatch_to_triton(device, gen):
    w = torch.randn(6, 4, generator=gen, dtype=F64).to(device)
    u = torch.nn.functional.normalize(torch.randn(4, generator=gen, dtype=F64), dim=0).to(device)
    kw = torch.randn(3, 2, 3, 3, generator=gen, dtype=F64).to(device)
    ku = torch.nn.functional.normalize(torch.randn(1, 2 * 6 * 5, generator=gen, dtype=F64), dim=1)
    ku = ku.reshape(1, 2, 6, 5).to(device)
    with ops.use_backend("triton"):
        for op in ("power_iteration_linear", "power_iteration_conv"):
            assert ops.resolve_backend(device, op) == "triton"
        got_lin = ops.power_iteration_linear(w, u, 3)
        got_conv = ops.power_iteration_conv(kw, ku, 3, stride=2, padding=(0, 1, 1, 0))
    with ops.use_backend("reference"):
        want_lin = ops.power_iteration_linear(w, u, 3)
        want_conv = ops.power_iteration_conv(kw, ku, 3, stride=2, padding=(0, 1, 1, 0))
    for a, b in zip(got_lin + got_conv, want_lin + want_conv):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    import gloro_fast.kernels._utils as utils

    monkeypatch.setattr(utils, "INTERPRET", False)
    with ops.use_backend("triton"):  # a new selection: the choice is made again
        with pytest.raises(ValueError, match="triton.*TRITON_INTERPRET"):
            ops.class_distances(torch.randn(3, 2))
