"""``power_iteration_linear``: n_iter power iterations on one or several dense layers, then
σ̂_l = ‖W_l u_l‖; the iterates are carried from call to call like the layers' buffers.

Modes: ``fwd`` is a training forward (autograd records σ̂), ``fwd+bwd`` adds the backward
of Σ_l σ̂_l into the weights.

Contenders: naive (per layer, the public-code loop v = Wu/‖Wu‖, u = Wᵀv/‖Wᵀv‖ with autograd
through every iteration), eager (per layer, iterations under no_grad, σ̂ with autograd),
compile (of eager), gloro_fast backends (all layers in one call).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, compiled, contenders, label, pick, run_contender, zero_grads
from gloro_fast.ops import power_iteration_linear

# name → list of (out_features, in_features)
LAYER_SETS = {
    "1x256x256": [(256, 256)],
    "1x1024x1024": [(1024, 1024)],
    "1x512x4096": [(512, 4096)],  # 6C2F's dense layer
    "4x512x512": [(512, 512)] * 4,  # several layers in one call
    "1x2048x2048": [(2048, 2048)],
}
SETS = pick(list(LAYER_SETS), ["1x512x4096"])
N_ITERS = (10,)  # the naive form's count; n_iter=1 (training default) is in bench_model.py
MODES = ("fwd", "fwd+bwd")


def pi_naive(weights, iterates, n_iter):
    sigmas = []
    for k, W in enumerate(weights):
        u = iterates[k]
        for _ in range(n_iter):
            v = W @ u
            v = v / torch.linalg.vector_norm(v)
            u = W.t() @ v
            u = u / torch.linalg.vector_norm(u)
        sigmas.append(torch.linalg.vector_norm(W @ u))
        iterates[k] = u.detach()
    return sigmas


def pi_eager_fn(weights, iterates, n_iter: int):
    new, sigmas = [], []
    for W, u in zip(weights, iterates):
        with torch.no_grad():
            w = W.detach()
            for _ in range(n_iter):
                x = w.t() @ (w @ u)
                u = x / torch.linalg.vector_norm(x)
        sigmas.append(torch.linalg.vector_norm(W @ u))
        new.append(u)
    return new, sigmas


def make_inputs(shapes):
    weights = [torch.nn.init.orthogonal_(torch.empty(m, n, device=DEVICE, dtype=DTYPE)).requires_grad_()
               for m, n in shapes]
    iterates = []
    for _, n in shapes:
        u = torch.randn(n, device=DEVICE, dtype=DTYPE)
        iterates.append(u / torch.linalg.vector_norm(u))
    return weights, iterates


@pytest.mark.parametrize("contender", contenders())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_iter", N_ITERS)
@pytest.mark.parametrize("layers", SETS)
def test_power_iteration_linear(benchmark, layers, n_iter, mode, contender):
    shapes = LAYER_SETS[layers]
    weights, iterates = make_inputs(shapes)

    if contender == "naive":
        def sigmas_fn():
            return pi_naive(weights, iterates, n_iter)
    else:
        if contender == "eager":
            impl = pi_eager_fn
        elif contender == "compile":
            impl = compiled(("pi_linear", mode), pi_eager_fn)
        else:
            impl = power_iteration_linear

        def sigmas_fn():
            new, sigmas = impl(weights, iterates, n_iter)
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

    size = sum(m * n for m, n in shapes)
    kw = dict(case=f"power_iteration_linear {mode} {layers} n_iter={n_iter}", contender=label(contender),
              params={"layers": layers, "n_iter": n_iter}, size=size,
              extra={"op": "power_iteration_linear", "mode": mode})
    run_contender(benchmark, step, contender, ("power_iteration_linear",), **kw)
