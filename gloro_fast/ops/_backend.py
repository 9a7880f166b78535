"""Backend selection for the gloro_fast ops.

``auto`` (default) picks the fastest available implementation for the tensors' device;
today only the pure-PyTorch ``reference`` backend exists, so ``auto`` resolves to it.
The choice is read from ``GLORO_FAST_BACKEND`` when first needed, never at import.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "reference")
_state = {"backend": None}


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the implementation used by every op: one of ``BACKENDS``."""
    _state["backend"] = _validate(name)


def get_backend() -> str:
    """The configured backend (``GLORO_FAST_BACKEND`` or ``"auto"`` unless set)."""
    if _state["backend"] is None:
        return _validate(os.environ.get("GLORO_FAST_BACKEND", "auto"))
    return _state["backend"]


def resolve_backend(device: Optional[torch.device] = None) -> str:
    """The concrete backend that will run for tensors on ``device``."""
    name = get_backend()
    if name == "auto":
        return "reference"
    return name
