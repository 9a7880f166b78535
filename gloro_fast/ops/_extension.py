"""The ``cpp`` backend: the compiled extension ``gloro_fast._C`` (C++ CPU and CUDA kernels).

Importing ``gloro_fast._C`` registers its kernels with torch's dispatcher under the namespace
``_gloro_fast_cpp`` (one per dispatch key, CPU and CUDA); they take the schema of the op
they implement, copied here from ``torch.ops.gloro_fast.<op>`` (one schema per op, written
once in ``gloro_fast/ops/<op>.py``), so the dispatcher checks every C++ signature against it.
If the extension is missing (package installed without building it), one warning is issued
and the ops run on their reference implementation: never a crash.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch

from . import registry

__all__ = ["NAMESPACE", "extension_loaded", "register_cpp_kernels"]

NAMESPACE = "_gloro_fast_cpp"
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_state: Dict[str, Optional[bool]] = {"loaded": None}
_library = {}  # the torch.library.Library defining NAMESPACE (kept alive here)


def extension_loaded() -> bool:
    """Whether ``gloro_fast._C`` is importable (its kernels are then registered)."""
    if _state["loaded"] is None:
        try:
            from .. import _C  # noqa: F401  (registers the _gloro_fast_cpp kernels)

            _state["loaded"] = True
        except ImportError as exc:
            _state["loaded"] = False
            warnings.warn(
                f"gloro_fast: compiled extension not available ({exc}); using the reference "
                "PyTorch backend. Build it with `make install` (pip install --no-build-isolation -e .)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _state["loaded"]


def _define(name: str) -> None:
    """Give ``_gloro_fast_cpp::<name>`` the schema of ``gloro_fast::<name>``."""
    if "lib" not in _library:
        _library["lib"] = torch.library.Library(NAMESPACE, "DEF")
    schema = str(getattr(torch.ops.gloro_fast, name).default._schema)
    _library["lib"].define(schema.split("::", 1)[1])


def _names(op: str):
    """``op`` and, where the op has one, its backward op."""
    backward = f"{op}_backward"
    return (op, backward) if hasattr(torch.ops.gloro_fast, backward) else (op,)


def _unusable(op: str):
    names = tuple(f"{NAMESPACE}::{name}" for name in _names(op))

    def unusable(device_type: str) -> Optional[str]:
        key = _DISPATCH_KEY.get(device_type)
        if key is None or not all(torch._C._dispatch_has_kernel_for_dispatch_key(n, key) for n in names):
            return f"gloro_fast._C has no {device_type} kernels for {op}"
        return None

    return unusable


def register_cpp_kernels(op: str) -> Optional[str]:
    """Register the compiled kernels of ``op`` as its ``cpp`` backend; returns why not (the
    extension is missing) or None."""
    if not extension_loaded():
        return "gloro_fast._C is not built"
    names = _names(op)
    for name in names:
        if not hasattr(getattr(torch.ops, NAMESPACE), name):
            _define(name)
    ops = getattr(torch.ops, NAMESPACE)
    backward = getattr(ops, names[1]).default if len(names) > 1 else registry.kernels(op, "reference").backward
    registry.register_kernels(op, "cpp", forward=getattr(ops, op).default, backward=backward,
                              unusable=_unusable(op))
    return None
