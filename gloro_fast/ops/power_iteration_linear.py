"""``power_iteration_linear(W, u, n_iter)``: spectral-norm estimate of dense layers.

For each layer, with W ∈ R^{m×n} and a unit iterate u ∈ R^n:

    repeat n_iter times (no autograd):  u ← Wᵀ W u / ‖Wᵀ W u‖
    σ̂ = ‖W u‖                           (autograd w.r.t. W only: ∂σ̂/∂W = (W u) uᵀ / σ̂)

σ̂ ≤ ‖W‖₂ always, and converges to it from below.

The op ``torch.ops.gloro_fast.power_iteration_linear`` treats all layers of a call together
(the compiled kernels run one parallel region or launch per elementary step for all of
them). Besides the new iterates and σ̂ it returns each layer's image y = W u (m,), in the
accumulation dtype (float64 for float64 weights, float32 otherwise): the vector whose norm
is σ̂, which its backward op ``power_iteration_linear_backward`` takes instead of reading
W again (∂σ̂/∂W = y uᵀ / σ̂: one write of the gradient, no second pass over W).
Kernels: the reference below (one layer at a time), the C++ kernels (csrc/) and the Triton
kernels (kernels/), chosen by the backend table (gloro_fast/ops/registry.py).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .._validation import check_positive_int, check_tensor
from ._library import define_op
from ._power_iteration_common import power_iterate, runs_reference

__all__ = ["power_iteration_linear", "power_iteration_linear_reference"]

SCHEMA = "(Tensor[] weights, Tensor[] iterates, int n_iter) -> (Tensor[], Tensor[], Tensor[])"
BACKWARD_SCHEMA = ("(Tensor[] grad_sigmas, Tensor[] weights, Tensor[] iterates, Tensor[] sigmas, Tensor[] images) "
                   "-> Tensor[]")


def image_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's images W u for weights of ``dtype`` (the kernels' accumulation
    dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def power_iteration_linear_reference(
    weights: Sequence[torch.Tensor], iterates: Sequence[torch.Tensor], n_iter: int
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    new_iterates, sigmas, _images = _reference(weights, iterates, n_iter)
    return new_iterates, sigmas


def _reference(weights, iterates, n_iter):
    """:func:`power_iteration_linear_reference` and each layer's image y = W u, whose norm is σ̂."""
    new_iterates, sigmas, images = [], [], []
    for weight, u in zip(weights, iterates):
        with torch.no_grad():
            w = weight.detach()
            u = power_iterate(lambda x, w=w: w.t() @ (w @ x), u, n_iter)
        y = weight @ u
        sigmas.append(torch.linalg.vector_norm(y))
        new_iterates.append(u)
        images.append(y)
    return new_iterates, sigmas, images


def _check(weights, iterates, n_iter):
    """The op's argument check: returns ``(single, weights, iterates, n_iter)`` with
    ``weights`` and ``iterates`` as lists."""
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
    single, weights, iterates, n_iter = _check(weights, iterates, n_iter)
    # one call of a compiled kernel runs on one device: layers spread over several take the reference
    one_device = bool(weights) and all(w.device == weights[0].device for w in weights)
    if not one_device or runs_reference("power_iteration_linear", weights, weights[0].device.type):
        new_iterates, sigmas = power_iteration_linear_reference(weights, iterates, n_iter)
    else:
        new_iterates, sigmas, _images = _OP(weights, iterates, n_iter)
    if single:
        return new_iterates[0], sigmas[0]
    return new_iterates, sigmas


# ---- the op: reference kernels, fake kernels, autograd ----


def _reference_forward(weights, iterates, n_iter):
    with torch.no_grad():
        new_iterates, sigmas, images = _reference(weights, iterates, n_iter)
        images = [y.to(image_dtype(y.dtype)) for y in images]
    # outputs are fresh tensors: with n_iter = 0 the reference hands the iterates back
    return [u.clone() if n_iter == 0 else u for u in new_iterates], sigmas, images


def _differentiable_grads(grad_sigmas, weights, iterates):
    """∂(Σ_l g_l σ̂_l)/∂W_l by differentiable torch ops, σ̂ = ‖W u‖ recomputed (double backward)."""
    with torch.enable_grad():
        ws = [w if w.requires_grad else w.detach().requires_grad_(True) for w in weights]
        sigmas = [torch.linalg.vector_norm(w @ u) for w, u in zip(ws, iterates)]
        return torch.autograd.grad(sigmas, ws, grad_sigmas, create_graph=True, allow_unused=True)


def _reference_backward(grad_sigmas, weights, iterates, sigmas, images):
    grads = []
    for g, w, u, s, y in zip(grad_sigmas, weights, iterates, sigmas, images):
        scale = torch.where(s > 0, g / torch.where(s > 0, s, 1.0), 0.0)
        grads.append((scale * torch.outer(y, u.to(y.dtype))).to(w.dtype))
    return grads


def _fake(weights, iterates, n_iter):
    return ([u.new_empty(u.shape) for u in iterates], [w.new_empty(()) for w in weights],
            [w.new_empty((w.shape[0],), dtype=image_dtype(w.dtype)) for w in weights])


def _fake_backward(grad_sigmas, weights, iterates, sigmas, images):
    return [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    weights, _iterates, _n_iter = inputs
    new_iterates, sigmas, images = output
    ctx.mark_non_differentiable(*new_iterates, *images)
    ctx.num_layers = len(weights)
    ctx.save_for_backward(*weights, *new_iterates, *sigmas, *images)


def _backward(ctx, grad_iterates, grad_sigmas, grad_images):
    count = ctx.num_layers
    saved = ctx.saved_tensors
    weights, iterates = saved[:count], saved[count : 2 * count]
    sigmas, images = saved[2 * count : 3 * count], saved[3 * count :]
    grad_weights = [None] * count
    if any(ctx.needs_input_grad[0]):
        grads = [torch.zeros_like(s) if g is None else g for g, s in zip(grad_sigmas, sigmas)]
        if torch.is_grad_enabled():  # create_graph: a gradient that is itself differentiable
            grad_weights = list(_differentiable_grads(grads, weights, iterates))
        else:
            grad_weights = list(_BACKWARD_OP(grads, [w.detach() for w in weights], list(iterates), list(sigmas),
                                             list(images)))
        grad_weights = [g if need else None for g, need in zip(grad_weights, ctx.needs_input_grad[0])]
    return grad_weights, [None] * count, None


_OP, _BACKWARD_OP = define_op(
    "power_iteration_linear", SCHEMA, BACKWARD_SCHEMA,
    fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    reference_forward=_reference_forward, reference_backward=_reference_backward,
)
