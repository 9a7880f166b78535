"""``power_iteration_linear(W, u, n_iter)``: spectral-norm estimate of dense layers.

For each layer, with W ∈ R^{m×n} and a unit iterate u ∈ R^n:

    repeat n_iter times (no autograd):  u ← Wᵀ W u / ‖Wᵀ W u‖
    σ̂ = ‖W u‖                           (autograd w.r.t. W only: ∂σ̂/∂W = (W u) uᵀ / σ̂)

σ̂ ≤ ‖W‖₂ always, and converges to it from below.

Backends: ``reference`` (below, one layer at a time) and ``cpp``: the compiled custom ops
``torch.ops.gloro_fast.power_iteration_linear`` / ``power_iteration_linear_backward``
(csrc/cpu, csrc/cuda), which treat all layers of a call together (one parallel region or
kernel launch per elementary step). They are made differentiable and traceable here with
``register_autograd`` and ``register_fake``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .._validation import check_positive_int, check_tensor
from ._extension import register_op, resolve
from ._power_iteration_common import normalize_iterate

__all__ = ["power_iteration_linear", "power_iteration_linear_reference"]


def power_iteration_linear_reference(
    weights: Sequence[torch.Tensor], iterates: Sequence[torch.Tensor], n_iter: int
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    new_iterates, sigmas = [], []
    for weight, u in zip(weights, iterates):
        with torch.no_grad():
            w = weight.detach()
            for _ in range(n_iter):
                u = normalize_iterate(w.t() @ (w @ u), u)
        sigmas.append(torch.linalg.vector_norm(weight @ u))
        new_iterates.append(u)
    return new_iterates, sigmas


def _check_args(weights, iterates, n_iter):
    """Validate the arguments (shared with the Triton entry ``gloro_fast.kernels``); returns
    ``(single, weights, iterates, n_iter)`` with ``weights`` and ``iterates`` as lists."""
    single = isinstance(weights, torch.Tensor)
    if single:
        weights, iterates = [weights], [iterates]
    weights, iterates = list(weights), list(iterates)
    if len(weights) != len(iterates):
        raise ValueError(
            f"weights and iterates must have the same length, got {len(weights)} and {len(iterates)}"
        )
    n_iter = check_positive_int("n_iter", n_iter, allow_zero=True)
    for k, (w, u) in enumerate(zip(weights, iterates)):
        check_tensor(f"weights[{k}]", w, ndim=2, floating=True)
        check_tensor(f"iterates[{k}]", u, shape=(w.shape[1],), floating=True)
        if u.device != w.device or u.dtype != w.dtype:
            raise ValueError(
                f"iterates[{k}] must match weights[{k}] in dtype and device, got "
                f"{u.dtype}/{u.device} vs {w.dtype}/{w.device}"
            )
    return single, weights, iterates, n_iter


def power_iteration_linear(
    weights: Union[torch.Tensor, Sequence[torch.Tensor]],
    iterates: Union[torch.Tensor, Sequence[torch.Tensor]],
    n_iter: int = 1,
):
    """Run ``n_iter`` power iterations on one or many dense layers in one call.

    Args:
        weights: W of shape (m, n), or a list of them.
        iterates: u of shape (n,) (unit norm), or a list matching ``weights``.
        n_iter: iterations before the estimate (0: estimate with the given u).

    Returns:
        ``(u_new, sigma)`` for a single layer (u_new detached, sigma a 0-dim tensor
        differentiable w.r.t. W), or ``(list of u_new, list of sigma)`` for lists.
    """
    single, weights, iterates, n_iter = _check_args(weights, iterates, n_iter)
    backend = resolve("power_iteration_linear", weights[0].device.type) if weights else "reference"
    if backend in ("cpp", "triton") and any(w.device != weights[0].device for w in weights):
        backend = "reference"  # one call of a compiled kernel runs on one device
    if backend == "reference":
        new_iterates, sigmas = power_iteration_linear_reference(weights, iterates, n_iter)
    elif backend == "cpp":
        new_iterates, sigmas = torch.ops.gloro_fast.power_iteration_linear(weights, iterates, n_iter)
    elif backend == "triton":
        from ..kernels import power_iteration_linear as triton_kernels

        new_iterates, sigmas = triton_kernels.power_iteration_linear(weights, iterates, n_iter)
    else:  # pragma: no cover - guarded by set_backend
        raise RuntimeError(f"unknown backend {backend!r}")
    if single:
        return new_iterates[0], sigmas[0]
    return new_iterates, sigmas


# ---- registration of the compiled ops (only when gloro_fast._C loaded, only once) ----


def _fake_power_iteration_linear(weights, iterates, n_iter):
    return [u.new_empty(u.shape) for u in iterates], [w.new_empty(()) for w in weights]


def _fake_power_iteration_linear_backward(grad_sigmas, weights, iterates, sigmas):
    return [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    weights, _iterates, _n_iter = inputs
    new_iterates, sigmas = output
    ctx.mark_non_differentiable(*new_iterates)
    ctx.num_layers = len(weights)
    ctx.save_for_backward(*weights, *new_iterates, *sigmas)


def _backward(ctx, grad_iterates, grad_sigmas):
    count = ctx.num_layers
    saved = ctx.saved_tensors
    weights, iterates, sigmas = saved[:count], saved[count : 2 * count], saved[2 * count :]
    grad_weights = [None] * count
    if any(ctx.needs_input_grad[0]):
        grads = [torch.zeros_like(s) if g is None else g for g, s in zip(grad_sigmas, sigmas)]
        if torch.is_grad_enabled():
            # create_graph (double backward): the same gradient by differentiable torch ops,
            # with σ̂ = ‖W u‖ recomputed as a function of W
            grad_weights = list(_differentiable_grads(weights, iterates, grads))
        else:
            grad_weights = list(
                torch.ops.gloro_fast.power_iteration_linear_backward(grads, weights, iterates, sigmas)
            )
        grad_weights = [g if need else None for g, need in zip(grad_weights, ctx.needs_input_grad[0])]
    return grad_weights, [None] * count, None


def _differentiable_grads(weights, iterates, grads):
    with torch.enable_grad():
        ws = [w if w.requires_grad else w.detach().requires_grad_(True) for w in weights]
        sigmas = [torch.linalg.vector_norm(w @ u) for w, u in zip(ws, iterates)]
        return torch.autograd.grad(sigmas, ws, grads, create_graph=True, allow_unused=True)


register_op(
    "power_iteration_linear",
    fake=_fake_power_iteration_linear,
    fake_backward=_fake_power_iteration_linear_backward,
    backward=_backward,
    setup_context=_setup_context,
)
