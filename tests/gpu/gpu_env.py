"""Shared pieces of the GPU suite (tests/gpu): skip without CUDA, backends that run on CUDA.

Every test here runs on a CUDA device and is skipped (with that reason) on a machine without
one; ``make gpu-check`` runs them on a lent GPU. Imported as ``from tests.gpu.gpu_env import …``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device (make gpu-check on a GPU machine)")
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
F64 = torch.float64

# every backend that can run on CUDA tensors: the Triton kernels, the compiled CUDA kernels
# of gloro_fast._C ("cpp"), and the pure-PyTorch reference
CUDA_BACKENDS = ("triton", "cpp", "reference")
OPS = ("class_distances", "bottom_logit", "power_iteration_linear", "power_iteration_conv")


@contextlib.contextmanager
def backend(name: str):
    """Select ``name`` for the block; ``cpp`` must resolve to the compiled CUDA kernels (a
    GPU build without them is a failure here, never a silent fall-back to the reference)."""
    from gloro_fast.ops import resolve_backend, use_backend

    with use_backend(name):
        if name != "reference":
            for op in OPS:
                got = resolve_backend(CUDA, op)
                assert got == name, f"backend {name!r} resolves to {got!r} for {op} on CUDA (make gpu-check-build)"
        yield


@contextlib.contextmanager
def deterministic(on: bool = True):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def rand(*shape, gen, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
