"""Pieces shared by the power-iteration ops."""
from __future__ import annotations

import math

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


def power_iterate(step, u: torch.Tensor, n_iter: int, blocks: int = 1) -> torch.Tensor:
    """``n_iter`` power iterations u ← step(u) / ‖step(u)‖ from ``u`` (each of ``blocks`` equal
    leading blocks — the layers of a batched call, stacked on axis 0 or 1 — normalised on its
    own), keeping the starting block where the result's norm is 0 or not finite: a zero
    operator must not zero the iterate for good (the weights may move away from 0 on the next
    step). The check runs once, after the loop: a block that reaches 0 stays 0 (0/0 is NaN,
    and NaN stays NaN), so the loop itself is the two operations a user writes, no host
    sync. (An exact 0 can only come from the first step: every later iterate lies in the
    range of AᵀA.) It reads the last step's norm r: the result is finite and non-zero iff
    0 < r < inf (r = 0: a zero or underflowing image; r = inf: an infinite entry or
    overflowing squares, and the result is then 0 or NaN; NaN fails both comparisons), so
    no second reduction over the iterate is needed."""
    if n_iter == 0:
        return u
    start = u
    for _ in range(n_iter):
        new = step(u)
        if blocks == 1:  # one norm of the whole tensor (no reshape: its own, cheaper reduction)
            norm = torch.linalg.vector_norm(new)
            u = new / norm
        else:
            flat = new.reshape(blocks, -1)
            norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
            u = (flat / norm).reshape(new.shape)
    ok = (norm > 0) & (norm < math.inf)
    if blocks == 1:
        return torch.where(ok, u, start)
    return torch.where(ok, u.reshape(blocks, -1), start.reshape(blocks, -1)).reshape(u.shape)
