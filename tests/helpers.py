"""Shared test helpers (imported as ``from tests.helpers import …``): explicit matrices of
linear operators, matrices with a planted spectral gap, and the reference backend. The
fixtures (``gen``, ``single_thread``, ``backend``, ``debug_checks``) are in tests/conftest.py."""
from __future__ import annotations

import math

import torch

from gloro_fast.ops import use_backend


def explicit_matrix(op, in_shape, dtype=torch.float64):
    """The matrix M (m × n) of the linear map ``op`` on inputs of shape ``in_shape``.

    ``op`` takes a batch (n, *in_shape) and returns (n, *out_shape); column k of M is
    ``op`` applied to the k-th standard basis vector, flattened.
    """
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *in_shape)
    with torch.no_grad():
        out = op(basis)
    return out.reshape(n, -1).t().contiguous()


def planted_matrix(m, n, gen, top, rest, dtype=torch.float64):
    """W = U diag(s) Vᵀ (m × n) with s_1 = top and the others in [0, rest): a clear
    spectral gap, so power iteration converges in few steps."""
    r = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=dtype))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    s = torch.rand(r, generator=gen, dtype=dtype) * rest
    s[0] = top
    return q1[:, :r] @ torch.diag(s) @ q2[:, :r].t()


def reference_backend():
    """Force the reference backend inside the block, restoring the previous choice."""
    return use_backend("reference")
