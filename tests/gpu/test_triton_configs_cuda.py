"""Every autotuning config of the Triton kernels, launched one by one on the GPU.

Autotuning keeps only the fastest config, so a config that computes wrong results would pass
every other test until some shape picks it. Here each one runs directly (the kernel under the
Autotuner, with the config's block sizes and warps) and is checked against the reference.
"""
from __future__ import annotations

import pytest
import torch
import triton

from tests.gpu.gpu_env import CUDA, F64, requires_cuda

pytestmark = requires_cuda


def _launch(autotuned, grid, *args, **constexprs):
    """Run every config of ``autotuned`` and yield (config, None) after each launch."""
    for config in autotuned.configs:
        meta = dict(config.kwargs)
        g = grid(meta) if callable(grid) else grid
        autotuned.fn[g](*args, **constexprs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
        yield config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c, d", [(26, 37), (130, 300)])
def test_class_distances_configs(dtype, c, d):
    from gloro_fast.kernels import class_distances as cd
    from gloro_fast.ops import class_distances_reference

    fp64 = dtype == F64
    w = (torch.randn(c, d, dtype=F64) + 3.0).to(CUDA, dtype)
    ref = class_distances_reference(w.double().cpu(), exact=True)
    tol = 1e-10 if fp64 else 1e-4
    mean = w.to(torch.float64 if fp64 else torch.float32).mean(0)
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]))  # noqa: E731
    out = torch.empty(c, c, dtype=dtype, device=CUDA)
    for config in _launch(cd.GRAM_KERNELS[fp64], grid, w, mean, out, c, d, FP64=fp64):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * float(ref.max()), msg=str(config))
        out.fill_(float("nan"))
    for config in _launch(cd.EXACT_KERNELS[fp64], grid, w, out, c, d, FP64=fp64):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * float(ref.max()), msg=str(config))
        out.fill_(float("nan"))
    g = torch.randn(c, c, device=CUDA, dtype=dtype)
    dist = ref.to(CUDA, dtype)
    acc = torch.float64 if fp64 else torch.float32
    s = torch.empty(c, c, dtype=acc, device=CUDA)
    rowsum = torch.empty(c, dtype=acc, device=CUDA)
    m = torch.where(dist > 0, g.to(acc) / dist.to(acc).clamp_min(1e-30), torch.zeros((), dtype=acc, device=CUDA))
    want = m + m.t()
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]),)  # noqa: E731
    for config in _launch(cd.BACKWARD_S_KERNELS[fp64], grid, g, dist, s, rowsum, c, FP64=fp64):
        torch.testing.assert_close(s, want, rtol=tol, atol=tol, msg=str(config))
        torch.testing.assert_close(rowsum, want.sum(1), rtol=tol * 10, atol=tol * 10, msg=str(config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [10, 300])
@pytest.mark.parametrize("given", [False, True])
def test_bottom_logit_forward_configs(dtype, c, given):
    from gloro_fast.kernels import bottom_logit as bl
    from gloro_fast.ops import bottom_logit_reference

    b = 257
    f = torch.randn(b, c, dtype=F64)
    d = torch.rand(c, c, dtype=F64)
    d = (d + d.t()).fill_diagonal_(0.0)
    k = torch.tensor(1.5, dtype=F64)
    classes = torch.randint(0, c, (b,)) if given else None
    rb, ri = bottom_logit_reference(f, d, k, 0.3, classes)
    acc = torch.float64 if dtype == F64 else torch.float32
    ek = (k.to(acc) * 0.3).reshape(1).to(CUDA)
    fbot = torch.empty(b, dtype=dtype, device=CUDA)
    istar = torch.empty(b, dtype=torch.int64, device=CUDA)
    j = torch.empty(b, dtype=torch.int64, device=CUDA)
    cls = classes.to(CUDA) if given else j
    block_c = bl.block_c(c)
    for config in _launch(bl.forward_kernel(block_c), lambda meta: (triton.cdiv(b, meta["BLOCK_B"]),),
                          f.to(CUDA, dtype), d.to(CUDA, dtype), ek, cls, fbot, istar, j, b, c,
                          HAS_CLASSES=given, FP64=dtype == F64, BLOCK_C=block_c):
        assert torch.equal(istar.cpu(), ri), config
        tol = 1e-12 if dtype == F64 else 1e-5
        torch.testing.assert_close(fbot.double().cpu(), rb, rtol=tol, atol=tol, msg=str(config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_iteration_linear_configs(dtype):
    from gloro_fast.kernels import power_iteration_linear as pl
    from gloro_fast.ops import power_iteration_linear_reference

    shapes = [(300, 70), (5, 513), (1, 1)]
    ws = [torch.randn(m, n, dtype=F64) for m, n in shapes]
    us = [torch.nn.functional.normalize(torch.randn(n, dtype=F64), dim=0) for _, n in shapes]
    rus, rss = power_iteration_linear_reference(ws, us, 3)
    acc = torch.float64 if dtype == F64 else torch.float32
    w_flat = torch.cat([w.reshape(-1) for w in ws]).to(CUDA, dtype)
    u_flat = torch.cat(us).to(CUDA, dtype)
    meta = pl.layer_table(shapes, CUDA)
    sum_m, sum_n = sum(m for m, _ in shapes), sum(n for _, n in shapes)
    u_out = torch.empty(sum_n, dtype=dtype, device=CUDA)
    sigma = torch.empty(len(shapes), dtype=dtype, device=CUDA)
    v, cur, t = (torch.empty(k, dtype=acc, device=CUDA) for k in (sum_m, sum_n, sum_n))
    tol = 1e-10 if dtype == F64 else 2e-5
    for config in _launch(pl.forward_kernel, (len(shapes),), w_flat, u_flat, meta, u_out, sigma,
                          v, cur, t, 3, len(shapes), 300, 513, FP64=dtype == F64):
        torch.testing.assert_close(sigma.double().cpu(), torch.stack(rss), rtol=tol, atol=tol, msg=str(config))
        torch.testing.assert_close(u_out.double().cpu(), torch.cat(rus), rtol=tol, atol=tol, msg=str(config))
