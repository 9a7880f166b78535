"""``bottom_logit(f, D, K, eps, classes)``: the ⊥ logit of a GloRo net.

For each row b with reference class j = classes[b] (default: argmax f_b, ties → lowest
index):

    f_⊥ = max_{i ≠ j} (f_i + ε · K · D_ji),   i* = the maximising i (ties → lowest).

Only index j is masked: masking every class tied with j would skip a competitor whose
margin is zero and certify wrongly. Gradients flow into f (at i*), D (at [j, i*]) and K.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._validation import check_epsilon, check_finite, check_labels, check_tensor
from ._backend import resolve_backend

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
    if not torch.compiler.is_compiling() and float(lipschitz.detach()) < 0:
        raise ValueError(f"lipschitz must be >= 0, got {float(lipschitz.detach())}")
    if classes is not None:
        classes = check_labels("classes", classes, logits.shape[0], num_classes, logits.device)
    backend = resolve_backend(logits.device)
    if backend == "reference":
        return bottom_logit_reference(logits, distances, lipschitz, epsilon, classes)
    raise RuntimeError(f"unknown backend {backend!r}")  # pragma: no cover
