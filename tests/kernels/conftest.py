"""Triton kernel tests: on CPU through the Triton interpreter, on a GPU natively.

Triton reads TRITON_INTERPRET when triton itself is imported (triton.language's jit helpers
are decorated then) and when each kernel is decorated, so it is set here, at collection of
this folder, before any test module imports ``gloro_fast.kernels``. Other test modules may
have imported torch already: that is fine, torch does not import triton. Where a CUDA device
exists the kernels run natively instead, and the interpreter is left off so the rest of the
suite (torch.compile's generated Triton kernels) is unaffected.

If triton had already been imported without the interpreter in this process (and there is
no GPU), the kernel tests skip with that reason instead of failing.
"""
from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if _CUDA else "cpu")

try:
    import triton  # noqa: F401  (imported after TRITON_INTERPRET is set)

    from gloro_fast.kernels._utils import unusable_reason

    _REASON = unusable_reason(DEVICE)
except ImportError as exc:  # pragma: no cover - triton is a dev dependency
    _REASON = f"triton is not installed ({exc})"


@pytest.fixture(autouse=True)
def _kernels_usable():
    if _REASON is not None:
        pytest.skip(f"Triton kernels unusable here: {_REASON}")


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return DEVICE


def expanded_like(t: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """A stride-0 gradient, like the one ``.sum()`` sends back."""
    return torch.tensor(value, dtype=t.dtype, device=t.device).expand_as(t)
