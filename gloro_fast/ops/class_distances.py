"""``class_distances(W)``: pairwise l2 distances between the rows of the head weight.

D ∈ R^{C×C}, D_ji = ‖w_j − w_i‖₂ for W ∈ R^{C×d}. With the body's Lipschitz bound K,
K·D_ji bounds the Lipschitz constant of the margin f_j − f_i (docs/architecture.md, "The math").

Backward: ∂D_ji/∂w_j = (w_j − w_i)/D_ji, taken as 0 where D_ji = 0 (the diagonal); for an
upstream gradient G, with M = G/D (0 where D = 0) and S = M + Mᵀ, grad_W = diag(S·1) W − S W.

The op ``torch.ops.gloro_fast.class_distances`` and its backward op
``class_distances_backward``; kernels: the reference below, the C++ kernels (csrc/) and the
Triton kernels (kernels/), chosen by the backend table (gloro_fast/ops/registry.py).
"""
from __future__ import annotations

import torch

from .._validation import check_finite, check_tensor
from ._backend import backend_for
from ._library import define_op

__all__ = ["class_distances", "class_distances_reference"]

SCHEMA = "(Tensor weight, bool exact) -> Tensor"
BACKWARD_SCHEMA = "(Tensor grad, Tensor weight, Tensor distances) -> Tensor"


def class_distances_reference(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Reference: ``torch.cdist`` of the rows with themselves.

    ``exact=True`` takes direct differences (no cancellation, for certification);
    otherwise the Gram form ‖w_j‖² + ‖w_i‖² − 2 w_j·w_i (one GEMM) may be used.
    Neither materialises a C×C×d tensor.
    """
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    dist = torch.cdist(weight.unsqueeze(0), weight.unsqueeze(0), compute_mode=mode)[0]
    # The Gram form can leave tiny non-zeros on the diagonal; D_jj is exactly 0.
    eye = torch.eye(weight.shape[0], dtype=torch.bool, device=weight.device)
    return dist.masked_fill(eye, 0.0)


def _check(weight) -> None:
    """The op's argument check."""
    check_tensor("weight", weight, ndim=2, floating=True)
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (C, d) with C, d >= 1, got {tuple(weight.shape)}")
    check_finite("weight", weight)


def class_distances(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Pairwise row distances of ``weight`` (C, d) → (C, C), differentiable.

    Args:
        weight: head weight, floating point, shape (C, d), C ≥ 1, d ≥ 1.
        exact: use direct differences instead of the Gram form (slower, no cancellation).
    """
    _check(weight)
    if backend_for("class_distances", weight.device.type) == "reference":
        return class_distances_reference(weight, exact=exact)
    return _OP(weight, bool(exact))


# ---- the op: reference kernels, fake kernels, autograd ----


def _reference_backward(grad, weight, distances):
    m = torch.where(distances > 0, grad / torch.where(distances > 0, distances, 1.0), 0.0)
    s = m + m.t()
    return s.sum(dim=1, keepdim=True) * weight - s @ weight


def _fake(weight, exact):
    c = weight.shape[0]
    return weight.new_empty((c, c))


def _fake_backward(grad, weight, distances):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    weight, _exact = inputs
    ctx.save_for_backward(weight, output)


def _backward(ctx, grad):
    weight, distances = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_weight = _BACKWARD_OP(grad, weight, distances)
    return grad_weight, None


_OP, _BACKWARD_OP = define_op(
    "class_distances", SCHEMA, BACKWARD_SCHEMA,
    fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    reference_forward=class_distances_reference, reference_backward=_reference_backward,
)
