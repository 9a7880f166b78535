"""``power_iteration_linear(W, u, n_iter)``: spectral-norm estimate of dense layers.

For each layer, with W ∈ R^{m×n} and a unit iterate u ∈ R^n:

    repeat n_iter times (no autograd):  u ← Wᵀ W u / ‖Wᵀ W u‖
    σ̂ = ‖W u‖                           (autograd w.r.t. W only: ∂σ̂/∂W = (W u) uᵀ / σ̂)

σ̂ ≤ ‖W‖₂ always, and converges to it from below.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .._validation import check_positive_int, check_tensor
from ._backend import resolve_backend
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
    backend = resolve_backend(weights[0].device if weights else None)
    if backend != "reference":  # pragma: no cover
        raise RuntimeError(f"unknown backend {backend!r}")
    new_iterates, sigmas = power_iteration_linear_reference(weights, iterates, n_iter)
    if single:
        return new_iterates[0], sigmas[0]
    return new_iterates, sigmas
