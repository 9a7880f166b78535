"""Backend selection for the gloro_fast ops.

``auto`` (default): on CUDA tensors the Triton kernels (``gloro_fast.kernels``) when
triton is installed, else the compiled CUDA kernels; on CPU tensors the compiled C++
kernels (``cpp``) when the extension provides them; else ``reference``. ``cpp`` asks for
the compiled kernels explicitly (falling back to reference, with the extension's one
warning, where there are none). ``triton`` asks for the Triton kernels: on CUDA tensors,
or on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``, a test tool,
never picked automatically). The choice comes from :func:`set_backend`, else from
``GLORO_FAST_BACKEND``, read when first needed, never at import.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ._extension import has_kernel

BACKENDS = ("auto", "reference", "cpp", "triton")
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


def triton_unusable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from ..kernels._utils import unusable_reason
    except ImportError as exc:  # a broken triton install must not break the package
        return f"gloro_fast.kernels failed to import ({exc})"
    return unusable_reason(device)


def resolve_backend(device: Optional[torch.device] = None, op: Optional[str] = None) -> str:
    """The concrete backend (``"triton"``, ``"cpp"`` or ``"reference"``) that runs ``op``
    on ``device``."""
    name = get_backend()
    if name == "reference" or op is None or device is None:
        return "reference"
    device = torch.device(device)
    if name == "triton":
        reason = triton_unusable_reason(device)
        if reason is not None:
            raise ValueError(f"backend 'triton' cannot run on {device} tensors: {reason}")
        return "triton"
    if name == "auto" and device.type == "cuda" and triton_unusable_reason(device) is None:
        return "triton"
    return "cpp" if has_kernel(op, device) else "reference"
