"""Environment of the Triton kernel tests: on CPU through the Triton interpreter, on a GPU natively.

Every test module here imports this module first (before ``gloro_fast.kernels``) and takes
its fixtures with ``from gloro_triton_env import device, kernels_usable``. It is not a
``conftest.py`` on purpose: tests/ has no ``__init__.py``, so a second ``conftest.py`` would
be imported as module ``conftest`` too and shadow tests/conftest.py for the modules that do
``from conftest import planted_matrix``.

Triton reads TRITON_INTERPRET when triton itself is imported (triton.language's jit helpers
are decorated then) and when each kernel is decorated, so it is set here, before any test
module imports ``gloro_fast.kernels``. Other test modules may have imported torch already:
that is fine, torch does not import triton. Where a CUDA device
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

    from gloro_fast.ops import resolve_backend, use_backend

    try:
        with use_backend("triton"):  # says why where the Triton kernels cannot run
            resolve_backend(DEVICE, "class_distances")
        _REASON = None
    except ValueError as exc:
        _REASON = str(exc)
except ImportError as exc:  # pragma: no cover - triton is a dev dependency
    _REASON = f"triton is not installed ({exc})"


@pytest.fixture(autouse=True)
def kernels_usable():
    """Autouse in every module that imports it: skip (with the reason) where the kernels cannot run."""
    if _REASON is not None:
        pytest.skip(f"Triton kernels unusable here: {_REASON}")


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return DEVICE

