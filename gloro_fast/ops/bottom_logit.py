"""``bottom_logit(f, D, K, eps, classes)``: the ⊥ logit of a GloRo net.

For each row b with reference class j = classes[b] (default: argmax f_b, ties → lowest
index):

    f_⊥ = max_{i ≠ j} (f_i + ε · K · D_ji),   i* = the maximising i (ties → lowest).

Only index j is masked: masking every class tied with j would skip a competitor whose
margin is zero and certify wrongly. Gradients flow into f (at i*), D (at [j, i*]) and K.

Backends: ``reference`` (below) and ``cpp``: the compiled custom ops
``torch.ops.gloro_fast.bottom_logit`` / ``bottom_logit_backward`` (csrc/cpu, csrc/cuda),
made differentiable and traceable here with ``register_autograd`` and ``register_fake``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._validation import capturing_cuda_graph, check_epsilon, check_finite, check_labels, check_tensor
from ._extension import register_op, resolve

__all__ = ["bottom_logit", "bottom_logit_reference"]


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


def _check_args(logits, distances, lipschitz) -> torch.Tensor:
    """Shape, dtype and device checks (shared with the Triton entry ``gloro_fast.kernels``);
    returns ``lipschitz`` as a 0-dim tensor of the logits' dtype and device."""
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
    return lipschitz


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
    lipschitz = _check_args(logits, distances, lipschitz)
    num_classes = logits.shape[1]
    epsilon = check_epsilon(epsilon)
    check_finite("logits", logits)
    check_finite("distances", distances)
    check_finite("lipschitz", lipschitz)
    if not (torch.compiler.is_compiling() or capturing_cuda_graph()) and float(lipschitz.detach()) < 0:
        raise ValueError(f"lipschitz must be >= 0, got {float(lipschitz.detach())}")
    if classes is not None:
        classes = check_labels("classes", classes, logits.shape[0], num_classes, logits.device)
    backend = resolve("bottom_logit", logits.device.type)
    if backend == "reference":
        return bottom_logit_reference(logits, distances, lipschitz, epsilon, classes)
    if backend == "cpp":
        bottom, i_star, _ = torch.ops.gloro_fast.bottom_logit(logits, distances, lipschitz, epsilon, classes)
        return bottom, i_star
    if backend == "triton":
        from ..kernels import bottom_logit as triton_kernels

        return triton_kernels.bottom_logit(logits, distances, lipschitz, epsilon, classes)
    raise RuntimeError(f"unknown backend {backend!r}")  # pragma: no cover


# ---- registration of the compiled ops (only when gloro_fast._C loaded, only once) ----


def _fake_bottom_logit(logits, distances, lipschitz, epsilon, classes):
    b = logits.shape[0]
    return (
        logits.new_empty((b,)),
        logits.new_empty((b,), dtype=torch.int64),
        logits.new_empty((b,), dtype=torch.int64),
    )


def _fake_bottom_logit_backward(grad_bottom, distances, lipschitz, epsilon, i_star, classes, num_classes):
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
    grad_f, grad_d, grad_k = torch.ops.gloro_fast.bottom_logit_backward(
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


register_op(
    "bottom_logit",
    fake=_fake_bottom_logit,
    fake_backward=_fake_bottom_logit_backward,
    backward=_backward,
    setup_context=_setup_context,
)
