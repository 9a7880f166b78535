"""``bottom_logit(f, D, K, eps, classes)``: the ⊥ logit of a GloRo net.

For each row b with reference class j = classes[b] (default: argmax f_b, ties → lowest
index):

    f_⊥ = max_{i ≠ j} (f_i + ε · K · D_ji),   i* = the maximising i (ties → lowest).

Only index j is masked: masking every class tied with j would skip a competitor whose
margin is zero and certify wrongly. Gradients flow into f (at i*), D (at [j, i*]) and K.

The op ``torch.ops.gloro_fast.bottom_logit`` returns (f_⊥, i*, j); its backward op
``bottom_logit_backward`` returns the gradients into (f, D, K). Kernels: the reference
below, the C++ kernels (csrc/) and the Triton kernels (kernels/), chosen by the backend
table (gloro_fast/ops/registry.py).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._validation import check_epsilon, check_finite, check_labels, check_tensor, value_checks
from ._backend import backend_for
from ._library import define_op

__all__ = ["bottom_logit", "bottom_logit_reference"]

SCHEMA = ("(Tensor logits, Tensor distances, Tensor lipschitz, float epsilon, Tensor? classes) "
          "-> (Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor grad_bottom, Tensor distances, Tensor lipschitz, float epsilon, Tensor i_star, "
                   "Tensor classes, int num_classes) -> (Tensor, Tensor, Tensor)")


def bottom_logit_reference(
    logits: torch.Tensor,
    distances: torch.Tensor,
    lipschitz: torch.Tensor,
    epsilon: float,
    classes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference in plain PyTorch ops (B×C temporaries); autograd gives the backward."""
    if classes is None:
        classes = logits.argmax(dim=1)  # documented: first maximal index on ties
    extra = logits + (epsilon * lipschitz) * distances.index_select(0, classes)
    own = torch.nn.functional.one_hot(classes, logits.shape[1]).bool()
    extra = extra.masked_fill(own, float("-inf"))
    bottom, i_star = extra.max(dim=1)
    return bottom, i_star


def _check(logits, distances, lipschitz, epsilon, classes):
    """The op's argument check: returns ``(lipschitz, epsilon, classes)`` as the op takes
    them (a 0-dim tensor of the logits' dtype and device, a float, int64 or None)."""
    check_tensor("logits", logits, ndim=2, floating=True)
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"logits must have at least 2 classes (shape (B, C>=2)), got {tuple(logits.shape)}")
    check_tensor("distances", distances, shape=(num_classes, num_classes), floating=True)
    if distances.device != logits.device or distances.dtype != logits.dtype:
        raise ValueError(
            f"distances must match logits in dtype and device ({logits.dtype} on {logits.device}), "
            f"got {distances.dtype} on {distances.device}"
        )
    if not isinstance(lipschitz, torch.Tensor):
        lipschitz = torch.tensor(float(lipschitz), dtype=logits.dtype, device=logits.device)
    check_tensor("lipschitz", lipschitz, ndim=0, floating=True)
    if lipschitz.device != logits.device or lipschitz.dtype != logits.dtype:
        raise ValueError(
            f"lipschitz must match logits in dtype and device ({logits.dtype} on {logits.device}), "
            f"got {lipschitz.dtype} on {lipschitz.device}"
        )
    epsilon = check_epsilon(epsilon)
    check_finite("logits", logits)
    check_finite("distances", distances)
    check_finite("lipschitz", lipschitz)
    if value_checks() and float(lipschitz.detach()) < 0:
        raise ValueError(f"lipschitz must be >= 0, got {float(lipschitz.detach())}")
    if classes is not None:
        classes = check_labels("classes", classes, logits.shape[0], num_classes, logits.device)
    return lipschitz, epsilon, classes


def bottom_logit(
    logits: torch.Tensor,
    distances: torch.Tensor,
    lipschitz: Union[torch.Tensor, float],
    epsilon: float,
    classes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """⊥ logit and its maximising class.

    Args:
        logits: f, shape (B, C), floating point, C ≥ 2.
        distances: D, shape (C, C) (from :func:`class_distances`), same dtype/device.
        lipschitz: K ≥ 0, the body's Lipschitz bound (0-dim tensor or float).
        epsilon: ε ≥ 0.
        classes: optional (B,) integer reference classes j (default: argmax of f).

    Returns:
        ``(f_bot, i_star)``: shapes (B,) (dtype of f) and (B,) int64.
    """
    lipschitz, epsilon, classes = _check(logits, distances, lipschitz, epsilon, classes)
    if backend_for("bottom_logit", logits.device.type) == "reference":
        return bottom_logit_reference(logits, distances, lipschitz, epsilon, classes)
    bottom, i_star, _ = _OP(logits, distances, lipschitz, epsilon, classes)
    return bottom, i_star


# ---- the op: reference kernels, fake kernels, autograd ----


def _reference_forward(logits, distances, lipschitz, epsilon, classes):
    # the reference class j is an output: a fresh tensor, never the caller's classes
    j = logits.argmax(dim=1) if classes is None else classes.to(torch.int64, copy=True)
    bottom, i_star = bottom_logit_reference(logits, distances, lipschitz, epsilon, j)
    return bottom, i_star, j


def _reference_backward(grad_bottom, distances, lipschitz, epsilon, i_star, classes, num_classes):
    grad_f = grad_bottom.new_zeros((grad_bottom.shape[0], num_classes))
    grad_f.scatter_(1, i_star[:, None], grad_bottom[:, None])
    grad_d = torch.zeros_like(distances).index_put_((classes, i_star), grad_bottom * (epsilon * lipschitz),
                                                    accumulate=True)
    grad_k = (grad_bottom * distances[classes, i_star]).sum() * epsilon
    return grad_f, grad_d, grad_k.to(lipschitz.dtype)


def _fake(logits, distances, lipschitz, epsilon, classes):
    b = logits.shape[0]
    return (
        logits.new_empty((b,)),
        logits.new_empty((b,), dtype=torch.int64),
        logits.new_empty((b,), dtype=torch.int64),
    )


def _fake_backward(grad_bottom, distances, lipschitz, epsilon, i_star, classes, num_classes):
    b = grad_bottom.shape[0]
    return (
        distances.new_empty((b, num_classes)),
        distances.new_empty(distances.shape),
        lipschitz.new_empty(()),
    )


def _setup_context(ctx, inputs, output):
    logits, distances, lipschitz, epsilon, _classes = inputs
    _bottom, i_star, classes = output
    ctx.save_for_backward(distances, lipschitz, i_star, classes)
    ctx.epsilon = epsilon
    ctx.num_classes = logits.shape[1]
    ctx.mark_non_differentiable(i_star, classes)


def _backward(ctx, grad_bottom, _grad_i_star, _grad_classes):
    distances, lipschitz, i_star, classes = ctx.saved_tensors
    grad_f, grad_d, grad_k = _BACKWARD_OP(
        grad_bottom, distances, lipschitz, ctx.epsilon, i_star, classes, ctx.num_classes
    )
    needs = ctx.needs_input_grad
    return (
        grad_f if needs[0] else None,
        grad_d if needs[1] else None,
        grad_k if needs[2] else None,
        None,
        None,
    )


_OP, _BACKWARD_OP = define_op(
    "bottom_logit", SCHEMA, BACKWARD_SCHEMA,
    fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    reference_forward=_reference_forward, reference_backward=_reference_backward,
)
