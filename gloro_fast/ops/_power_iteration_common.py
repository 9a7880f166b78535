"""Pieces shared by the power-iteration ops."""
from __future__ import annotations

import torch

from ._backend import backend_for, get_backend


def runs_reference(op: str, weights, device_type: str) -> bool:
    """Whether a call of ``op`` on ``weights`` (of ``device_type``) runs the reference in torch
    ops instead of the op: where the backend table says so, and under ``auto`` on CPU for a
    call that records an autograd graph (a training step). There torch's own autograd of the
    reference (C++ nodes, the image W u kept by the graph) beats the op's autograd formula,
    which runs in Python once per call and layer: 6C2F, n_iter = 1, forward + backward on the
    2-core Intel Xeon: 14.5 ms reference, 17.5 ms op with the C++ kernels (each layer's op
    adds ~150 µs of autograd bookkeeping). Calls without a graph (the iterations to
    convergence of certification) keep the C++ kernels: 52 vs 64 ms at n_iter = 10."""
    if backend_for(op, device_type) == "reference":
        return True
    return (device_type == "cpu" and get_backend() == "auto" and torch.is_grad_enabled()
            and any(w.requires_grad for w in weights))


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
