"""GloRo training losses. Notation: f (B, C) logits, f_⊥ (B,) the ⊥ logit, y (B,) labels,
K_ji (C, C) the margin Lipschitz constants (``GloroOutput.margin_lipschitz``), ε the radius.
All losses return the batch mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_epsilon, check_labels, check_tensor

__all__ = ["gloro_cross_entropy", "trades_loss", "emma_loss", "margin_loss", "LOSSES"]


def _check_logits(name: str, logits, min_classes: int) -> None:
    check_tensor(name, logits, ndim=2, floating=True)
    if logits.shape[1] < min_classes:
        raise ValueError(f"{name} must have at least {min_classes} columns, got {tuple(logits.shape)}")


def _check_lipschitz(margin_lipschitz, num_classes: int) -> None:
    check_tensor("margin_lipschitz", margin_lipschitz, shape=(num_classes, num_classes), floating=True)


def gloro_cross_entropy(augmented: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE([f, f_⊥], y): cross-entropy over the C + 1 logits; the ⊥ class is never a label.

    augmented: (B, C + 1); labels: (B,) in [0, C).
    """
    _check_logits("augmented", augmented, 3)
    labels = check_labels("labels", labels, augmented.shape[0], augmented.shape[1] - 1, augmented.device)
    return F.cross_entropy(augmented, labels)


def trades_loss(augmented: torch.Tensor, labels: torch.Tensor, lam: float = 1.0,
                form: str = "kl") -> torch.Tensor:
    """TRADES-style GloRo loss: CE(f, y) + λ · R.

    ``form="kl"``: R = KL(softmax(f) ‖ softmax([f, f_⊥])) = logsumexp([f, f_⊥]) − logsumexp(f),
    the closed form (the clean distribution puts no mass on ⊥).
    ``form="ce"``: R = −Σ_i softmax(f)_i log softmax([f, f_⊥])_i, the cross-entropy with the
    clean distribution as a soft target (= the KL term plus the entropy of softmax(f)).
    """
    _check_logits("augmented", augmented, 3)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if form not in ("kl", "ce"):
        raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
    num_classes = augmented.shape[1] - 1
    labels = check_labels("labels", labels, augmented.shape[0], num_classes, augmented.device)
    logits = augmented[:, :num_classes]
    clean = F.cross_entropy(logits, labels)
    if form == "kl":
        robust = torch.logsumexp(augmented, dim=1) - torch.logsumexp(logits, dim=1)
    else:
        target = F.softmax(logits, dim=1)
        robust = -(target * F.log_softmax(augmented, dim=1)[:, :num_classes]).sum(dim=1)
    return clean + lam * robust.mean()


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, margin_lipschitz: torch.Tensor,
                epsilon: float) -> torch.Tensor:
    """True-label margin loss: CE(f + ε K_{y·}, y), every rival i raised by ε K_yi (K_yy = 0)."""
    _check_logits("logits", logits, 2)
    _check_lipschitz(margin_lipschitz, logits.shape[1])
    epsilon = check_epsilon(epsilon)
    labels = check_labels("labels", labels, logits.shape[0], logits.shape[1], logits.device)
    return F.cross_entropy(logits + epsilon * margin_lipschitz.index_select(0, labels), labels)


def emma_loss(logits: torch.Tensor, labels: torch.Tensor, margin_lipschitz: torch.Tensor,
              epsilon: float) -> torch.Tensor:
    """EMMA (Hu et al. 2023): z = f − f_y, per-rival radii ε_i = clip(−z_i / (ε K_yi), 0.01, 1)
    (detached), loss CE(z + ε_i · ε K_yi, y). Rivals already beyond the margin are pushed
    with their own (smaller) radius rather than the full ε."""
    _check_logits("logits", logits, 2)
    _check_lipschitz(margin_lipschitz, logits.shape[1])
    epsilon = check_epsilon(epsilon)
    labels = check_labels("labels", labels, logits.shape[0], logits.shape[1], logits.device)
    z = logits - logits.gather(1, labels.unsqueeze(1))
    k_y = epsilon * margin_lipschitz.index_select(0, labels)
    with torch.no_grad():
        scale = torch.where(k_y > 0, -z / k_y.clamp_min(torch.finfo(k_y.dtype).tiny), torch.ones_like(z))
        scale = scale.clamp(0.01, 1.0)
    return F.cross_entropy(z + scale * k_y, labels)


LOSSES = ("gloro_ce", "trades", "trades_ce", "emma", "margin")
