"""``power_iteration_conv``: n_iter power iterations on the real convolution operator
(zero padding, stride; I + conv for LiResNet blocks) on its input size, then
σ̂ = ‖A u‖; iterates are carried from call to call like the layers' buffers.

Modes: ``fwd`` is a training forward (autograd records σ̂), ``fwd+bwd`` adds the backward
of Σ σ̂ into the kernels. A case with several layers of one configuration (LiResNet's
blocks) uses ``power_iteration_conv_batched`` for gloro_fast when the package has it.

Contenders: naive (per layer, v = Au/‖Au‖, u = Aᵀv/‖Aᵀv‖ with autograd through every
iteration), eager (iterations under no_grad, σ̂ with autograd), compile (of eager),
gloro_fast backends.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, compiled, contenders, label, pick, run_contender, zero_grads
from gloro_fast.ops import power_iteration_conv
from gloro_fast.ops.convolution import conv_operator, conv_operator_adjoint

try:
    from gloro_fast.ops.power_iteration_conv import power_iteration_conv_batched
except ImportError:  # pragma: no cover - older package
    power_iteration_conv_batched = None

# name → (layers, c_out, c_in, k, stride, (H, W), pads (t, b, l, r), residual)
CONFIGS = {
    "c32k3@32x32": (1, 32, 32, 3, 1, (32, 32), (1, 1, 1, 1), False),
    "c64k3@16x16": (1, 64, 64, 3, 1, (16, 16), (1, 1, 1, 1), False),
    "c64k4s2@16x16": (1, 64, 64, 4, 2, (16, 16), (1, 1, 1, 1), False),
    "lires-c32k3@32x32": (1, 32, 32, 3, 1, (32, 32), (1, 1, 1, 1), True),
    "6xlires-c32k3@32x32": (6, 32, 32, 3, 1, (32, 32), (1, 1, 1, 1), True),
}
NAMES = pick(list(CONFIGS), ["c32k3@32x32"])
N_ITERS = (10,)  # the naive form's count; n_iter=1 (training default) is in bench_model.py
MODES = ("fwd", "fwd+bwd")


def pi_conv_naive(weights, iterates, n_iter, stride, pads, residual):
    args = ((stride, stride), pads, (1, 1), 1)
    sigmas = []
    for k, W in enumerate(weights):
        u = iterates[k]
        hw = u.shape[2:]
        for _ in range(n_iter):
            v = conv_operator(u, W, *args, residual=residual)
            v = v / torch.linalg.vector_norm(v)
            u = conv_operator_adjoint(v, W, *args, hw, residual=residual)
            u = u / torch.linalg.vector_norm(u)
        sigmas.append(torch.linalg.vector_norm(conv_operator(u, W, *args, residual=residual)))
        iterates[k] = u.detach()
    return sigmas


def pi_conv_eager(weights, iterates, n_iter: int, stride: int, pads, residual: bool):
    args = ((stride, stride), pads, (1, 1), 1)
    new, sigmas = [], []
    for W, u in zip(weights, iterates):
        hw = u.shape[2:]
        with torch.no_grad():
            w = W.detach()
            for _ in range(n_iter):
                x = conv_operator_adjoint(conv_operator(u, w, *args, residual=residual), w, *args, hw,
                                          residual=residual)
                u = x / torch.linalg.vector_norm(x)
        sigmas.append(torch.linalg.vector_norm(conv_operator(u, W, *args, residual=residual)))
        new.append(u)
    return new, sigmas


def pi_conv_gloro_fast(weights, iterates, n_iter, stride, pads, residual):
    if len(weights) > 1 and power_iteration_conv_batched is not None:
        return power_iteration_conv_batched(weights, iterates, n_iter, stride=stride, padding=pads,
                                            residual=residual)
    new, sigmas = [], []
    for W, u in zip(weights, iterates):
        u, s = power_iteration_conv(W, u, n_iter, stride=stride, padding=pads, residual=residual)
        new.append(u)
        sigmas.append(s)
    return new, sigmas


@pytest.mark.parametrize("contender", contenders())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_iter", N_ITERS)
@pytest.mark.parametrize("config", NAMES)
def test_power_iteration_conv(benchmark, config, n_iter, mode, contender):
    layers, c_out, c_in, k, stride, hw, pads, residual = CONFIGS[config]
    weights, iterates = [], []
    for _ in range(layers):
        w = torch.empty(c_out, c_in, k, k, device=DEVICE, dtype=DTYPE)
        torch.nn.init.orthogonal_(w)
        weights.append(w.requires_grad_())
        u = torch.randn(1, c_in, *hw, device=DEVICE, dtype=DTYPE)
        iterates.append(u / torch.linalg.vector_norm(u))

    if contender == "naive":
        def sigmas_fn():
            return pi_conv_naive(weights, iterates, n_iter, stride, pads, residual)
    else:
        if contender == "eager":
            impl = pi_conv_eager
        elif contender == "compile":
            impl = compiled(("pi_conv", mode), pi_conv_eager)
        else:
            impl = pi_conv_gloro_fast

        def sigmas_fn():
            new, sigmas = impl(weights, iterates, n_iter, stride, pads, residual)
            iterates[:] = list(new)
            return sigmas

    if mode == "fwd+bwd":
        def step():
            zero_grads(weights)
            total = torch.stack(sigmas_fn()).sum()
            total.backward()
            return total
    else:
        def step():
            return sigmas_fn()

    size = layers * c_out * c_in * k * k * hw[0] * hw[1] // (stride * stride)
    kw = dict(case=f"power_iteration_conv {mode} {config} n_iter={n_iter}", contender=label(contender),
              params={"config": config, "n_iter": n_iter}, size=size,
              extra={"op": "power_iteration_conv", "mode": mode})
    run_contender(benchmark, step, contender, ("power_iteration_conv",), **kw)
