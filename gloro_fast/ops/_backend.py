"""Backend selection for the gloro_fast ops.

``auto`` (default): the compiled kernels (``cpp``: C++ on CPU, CUDA on GPU) when the
extension provides one for the tensors' device, else ``reference``. ``cpp`` asks for the
compiled kernels explicitly (falling back to reference, with the extension's one
warning, where there are none). The choice comes from :func:`set_backend`, else from
``GLORO_FAST_BACKEND``, read when first needed, never at import.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._extension import has_kernel

BACKENDS = ("auto", "reference", "cpp")
_state = {"backend": None}


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Select the implementation used by every op (one of ``BACKENDS``); ``None`` returns
    to ``GLORO_FAST_BACKEND`` / ``"auto"``."""
    _state["backend"] = None if name is None else _validate(name)


def get_backend() -> str:
    """The configured backend (``GLORO_FAST_BACKEND`` or ``"auto"`` unless set)."""
    if _state["backend"] is None:
        return _validate(os.environ.get("GLORO_FAST_BACKEND", "auto"))
    return _state["backend"]


def resolve_backend(device: Optional[torch.device] = None, op: Optional[str] = None) -> str:
    """The concrete backend (``"cpp"`` or ``"reference"``) that runs ``op`` on ``device``."""
    name = get_backend()
    if name == "reference" or op is None or device is None:
        return "reference"
    return "cpp" if has_kernel(op, torch.device(device)) else "reference"
