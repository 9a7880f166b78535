"""Shared fixtures: a seeded generator, one thread, a named backend, debug checks. The helper
functions the tests import are in tests/helpers.py.

tests/kernels/gloro_triton_env is imported here, before any test module imports gloro_fast
(which imports triton): it sets TRITON_INTERPRET on a machine without CUDA, which triton reads
when imported, so the Triton kernel tests run under the interpreter in every session."""
from __future__ import annotations

import pytest
import torch

from tests.kernels import gloro_triton_env  # noqa: F401  (sets TRITON_INTERPRET first)


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
