"""Pieces shared by the power-iteration ops."""
from __future__ import annotations

import torch


def normalize_iterate(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new / ‖new‖, keeping ``old`` where ‖new‖ = 0 (a zero operator must not zero the
    iterate for good: the weights may move away from 0 on the next step). No host sync."""
    norm = torch.linalg.vector_norm(new)
    return torch.where(norm > 0, new / norm.clamp_min(torch.finfo(new.dtype).tiny), old)
