"""Pieces shared by the power-iteration ops."""
from __future__ import annotations

import torch


def normalize_iterate(new: torch.Tensor, old: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """new / ‖new‖ for each of ``blocks`` equal leading blocks of ``new`` (the layers of a
    batched call, stacked on axis 0 or 1), keeping ``old``'s block where ‖new‖ = 0: a zero
    operator must not zero the iterate for good, the weights may move away from 0 on the next
    step. No host sync."""
    tiny = torch.finfo(new.dtype).tiny
    if blocks == 1:  # one norm of the whole tensor (no reshape: its own, cheaper reduction)
        norm = torch.linalg.vector_norm(new)
        return torch.where(norm > 0, new / norm.clamp_min(tiny), old)
    flat_new, flat_old = new.reshape(blocks, -1), old.reshape(blocks, -1)
    norm = torch.linalg.vector_norm(flat_new, dim=1, keepdim=True)
    return torch.where(norm > 0, flat_new / norm.clamp_min(tiny), flat_old).reshape(new.shape)
