"""Loading of the compiled extension ``gloro_fast._C`` (C++ CPU and CUDA kernels).

The extension registers the custom ops ``torch.ops.gloro_fast.*``. If it is missing
(package installed without building it), one warning is issued and every op runs on
its reference implementation: never a crash.
"""
from __future__ import annotations

import warnings

import torch

_state = {"loaded": None}


def extension_loaded() -> bool:
    """Whether ``gloro_fast._C`` is importable (its ops are then registered)."""
    if _state["loaded"] is None:
        try:
            from .. import _C  # noqa: F401  (registers torch.ops.gloro_fast.*)

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


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.gloro_fast.<op>`` has a kernel for ``device``'s dispatch key."""
    if not extension_loaded():
        return False
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is None:
        return False
    name = f"gloro_fast::{op}"
    return any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, k)
        for k in (key, "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    )
