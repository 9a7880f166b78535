"""``class_distances(W)``: pairwise l2 distances between the rows of the head weight.

D ∈ R^{C×C}, D_ji = ‖w_j − w_i‖₂ for W ∈ R^{C×d}. With the body's Lipschitz bound K,
K·D_ji bounds the Lipschitz constant of the margin f_j − f_i (DESIGN.md, "margin").

Backward: ∂D_ji/∂w_j = (w_j − w_i)/D_ji, taken as 0 where D_ji = 0 (the diagonal).

Backends: ``reference`` (below) and ``cpp``: the compiled custom ops
``torch.ops.gloro_fast.class_distances`` / ``class_distances_backward`` (csrc/cpu, csrc/cuda),
made differentiable and traceable here with ``register_autograd`` and ``register_fake``.
"""
from __future__ import annotations

import torch

from .._validation import check_finite, check_tensor
from ._extension import register_op, resolve

__all__ = ["class_distances", "class_distances_reference"]


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


def _check_args(weight) -> None:
    """Rank, shape and dtype-kind checks (shared with the Triton entry ``gloro_fast.kernels``)."""
    check_tensor("weight", weight, ndim=2, floating=True)
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (C, d) with C, d >= 1, got {tuple(weight.shape)}")


def class_distances(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Pairwise row distances of ``weight`` (C, d) → (C, C), differentiable.

    Args:
        weight: head weight, floating point, shape (C, d), C ≥ 1, d ≥ 1.
        exact: use direct differences instead of the Gram form (slower, no cancellation).
    """
    _check_args(weight)
    check_finite("weight", weight)
    backend = resolve("class_distances", weight.device.type)
    if backend == "reference":
        return class_distances_reference(weight, exact=exact)
    if backend == "cpp":
        return torch.ops.gloro_fast.class_distances(weight, bool(exact))
    if backend == "triton":
        from ..kernels import class_distances as triton_kernels

        return triton_kernels.class_distances(weight, bool(exact))
    raise RuntimeError(f"unknown backend {backend!r}")  # pragma: no cover - guarded by set_backend


# ---- registration of the compiled ops (only when gloro_fast._C loaded, only once) ----


def _fake_class_distances(weight, exact):
    c = weight.shape[0]
    return weight.new_empty((c, c))


def _fake_class_distances_backward(grad, weight, distances):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    weight, _exact = inputs
    ctx.save_for_backward(weight, output)


def _backward_with(backward_op: str):
    """Autograd backward calling ``torch.ops.gloro_fast.<backward_op>(grad, weight, distances)``
    (looked up when called: the op exists only once its library is loaded)."""

    def _backward(ctx, grad):
        weight, distances = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = getattr(torch.ops.gloro_fast, backward_op)(grad, weight, distances)
        return grad_weight, None

    return _backward


_backward = _backward_with("class_distances_backward")


register_op(
    "class_distances",
    fake=_fake_class_distances,
    fake_backward=_fake_class_distances_backward,
    backward=_backward,
    setup_context=_setup_context,
)
