"""Fixtures of the Triton kernel tests (the environment is set in gloro_triton_env)."""
from __future__ import annotations

import pytest

from gloro_fast.ops import use_backend
from tests.kernels.gloro_triton_env import DEVICE, REASON


@pytest.fixture
def kernels_usable():
    """Skip (with the reason) where the kernels cannot run; modules that run the kernels use it
    with ``pytestmark = pytest.mark.usefixtures("kernels_usable", …)``."""
    if REASON is not None:
        pytest.skip(f"Triton kernels unusable here: {REASON}")


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture
def triton_backend():
    """The Triton backend selected for the test (the modules of one kernel use it)."""
    with use_backend("triton"):
        yield
