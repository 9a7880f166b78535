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


@torch.compiler.assume_constant_result
def resolve(op: str, device_type: str) -> str:
    """The backend for ``op`` on ``device_type``. Under torch.compile the answer is taken
    as a constant of the traced graph (the kernel lookup itself cannot be traced; changing
    the backend afterwards takes effect on the next compilation)."""
    from ._backend import resolve_backend  # ._backend imports this module

    return resolve_backend(torch.device(device_type), op=op)


# ---- registration of the compiled ops (only when gloro_fast._C loaded, only once) ----

_registered = set()


def already_registered(qualname: str) -> bool:
    """Whether ``qualname`` already has a fake kernel (e.g. registered before an
    ``importlib.reload`` of the module that registers it)."""
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(qualname).fake_impl.kernel is not None
    except Exception:  # pragma: no cover - private API moved
        return False


def register_op(op: str, *, fake, fake_backward, backward, setup_context) -> bool:
    """Make ``torch.ops.gloro_fast.<op>`` differentiable and traceable: the fake kernels
    of ``<op>`` and ``<op>_backward``, and the autograd formula of ``<op>``. Does nothing
    (returns False) when the extension is missing, and registers only once."""
    if not extension_loaded():
        return False
    qualname = f"gloro_fast::{op}"
    if qualname in _registered or already_registered(qualname):
        _registered.add(qualname)
        return True
    torch.library.register_fake(qualname)(fake)
    torch.library.register_fake(f"{qualname}_backward")(fake_backward)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    _registered.add(qualname)
    return True
