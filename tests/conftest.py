"""Shared test helpers: a seeded generator and explicit matrices of linear operators."""
from __future__ import annotations

import math

import pytest
import torch


def _explicit_matrix(op, in_shape, dtype=torch.float64):
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
    from gloro_fast.ops import use_backend

    return use_backend("reference")


@pytest.fixture
def explicit_matrix():
    return _explicit_matrix


@pytest.fixture
def gen():
    """A fixed-seed generator (tests stay deterministic and independent of order)."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def single_thread():
    """Run tiny ops on one thread: on a busy machine, intra-op threads of microsecond-sized
    convolutions wait on each other and slow them down by orders of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def backend():
    """Run a function under a named backend, restoring the configured one afterwards."""
    from gloro_fast.ops import use_backend

    def run(name, fn, *args, **kwargs):
        with use_backend(name):
            return fn(*args, **kwargs)

    return run


@pytest.fixture
def debug_checks():
    """Value checks on (gloro_fast.set_debug(True)) inside the test, restored afterwards."""
    import gloro_fast

    gloro_fast.set_debug(True)
    yield
    gloro_fast.set_debug(None)
