"""Environment of the Triton kernel tests: on CPU through the Triton interpreter, on a GPU natively.

Triton reads TRITON_INTERPRET when triton itself is imported (triton.language's jit helpers
are decorated then) and when each kernel is decorated, and importing gloro_fast imports
triton (through torch._dynamo). So tests/conftest.py imports this module before anything
imports gloro_fast: the variable is set once for the whole session, whichever test files
run and in whatever order. Where a CUDA device exists the kernels run natively instead, and
the interpreter is left off so the rest of the suite (torch.compile's generated Triton
kernels) is unaffected.

``DEVICE`` is where the kernels run; ``REASON`` says why they cannot run here (None when
they can). tests/kernels/conftest.py turns both into the ``device`` and ``kernels_usable``
fixtures.
"""
from __future__ import annotations

import os

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if _CUDA else "cpu")


def _reason() -> str | None:
    try:
        import triton  # noqa: F401  (imported after TRITON_INTERPRET is set)
    except ImportError as exc:  # pragma: no cover - triton is a dev dependency
        return f"triton is not installed ({exc})"
    from gloro_fast.ops import resolve_backend, use_backend

    try:
        with use_backend("triton"):  # says why where the Triton kernels cannot run
            resolve_backend(DEVICE, "class_distances")
    except ValueError as exc:
        return str(exc)
    return None


REASON = _reason()
