"""Which backend runs each op: the setting, and the choice per (op, device type), made once.

Setting (one of ``BACKENDS``): ``auto`` (default): on CUDA tensors the Triton kernels when
triton is usable, else the compiled kernels (``cpp``); on CPU tensors ``cpp``; else
``reference``. ``cpp`` asks for the compiled kernels (falling back to ``reference``, with
the extension's one warning, where there are none). ``triton`` asks for the Triton kernels:
on CUDA tensors, or on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``,
a test tool, never picked by ``auto``); where they cannot run it is an error. The setting
comes from :func:`set_backend` / :func:`use_backend`, else from ``GLORO_FAST_BACKEND``, read
when first needed (and again after ``set_backend(None)``), never at import.

The choice for (op, device type, setting) is resolved once, then read from a dict: the
per-call cost is a dictionary lookup (choices are made afresh after a new selection).
Providers are imported only when a choice needs them (``gloro_fast._C`` for ``cpp``,
``gloro_fast.kernels.<op>`` for ``triton``); they register their kernels in
:mod:`gloro_fast.ops.registry`, which also drops the cached choices.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import registry

__all__ = ["BACKENDS", "backend_for", "get_backend", "kernels_for", "resolve_backend", "set_backend",
           "use_backend"]

BACKENDS = ("auto", "reference", "cpp", "triton")

# "explicit": what set_backend chose (None: the environment); "setting": the effective one,
# None until first read
_state: Dict[str, Optional[str]] = {"explicit": None, "setting": None}
_choices: Dict[Tuple[str, str, str], Tuple[str, registry.Kernels]] = {}
registry.on_change(_choices.clear)


def _validate(name, what: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Select the implementation used by every op (one of ``BACKENDS``); ``None`` returns
    to ``GLORO_FAST_BACKEND`` / ``"auto"``."""
    _state["explicit"] = None if name is None else _validate(name)
    _state["setting"] = _state["explicit"]
    # a new selection is resolved afresh: providers may have become usable or unusable
    _choices.clear()


def get_backend() -> str:
    """The configured backend (``GLORO_FAST_BACKEND`` or ``"auto"`` unless set)."""
    setting = _state["setting"]
    if setting is None:
        setting = _state["setting"] = _validate(os.environ.get("GLORO_FAST_BACKEND", "auto"), "GLORO_FAST_BACKEND")
    return setting


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[str]:
    """``set_backend(name)`` inside the block, the previous selection restored after it
    (also on error); yields the selected setting."""
    before = _state["explicit"]
    try:
        set_backend(name)
        yield get_backend()
    finally:
        set_backend(before)


def _load(op: str, backend: str) -> Tuple[Optional[registry.Kernels], Optional[str]]:
    """(kernels, None) of ``backend`` for ``op``, importing its provider if needed; (None,
    why not) when the provider is missing."""
    found = registry.kernels(op, backend)
    if found is not None:
        return found, None
    if backend == "cpp":
        from ._extension import register_cpp_kernels

        reason = register_cpp_kernels(op)
    elif backend == "triton":
        reason = _import_triton_kernels(op)
    else:  # pragma: no cover - every op registers its reference when defined
        reason = f"no {backend} kernels"
    found = registry.kernels(op, backend)
    return found, (None if found is not None else reason or f"no {backend} kernels for {op}")


def _import_triton_kernels(op: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module(f"gloro_fast.kernels.{op}")
    except ImportError as exc:  # a broken triton install must not break the package
        return f"gloro_fast.kernels failed to import ({exc})"
    return None


def _usable(op: str, backend: str, device_type: str) -> Tuple[Optional[registry.Kernels], Optional[str]]:
    found, reason = _load(op, backend)
    if found is not None:
        reason = found.unusable(device_type)
    return (found, None) if reason is None else (None, reason)


def _choose(op: str, device_type: str, setting: str) -> Tuple[str, registry.Kernels]:
    reference = registry.kernels(op, "reference")
    if setting == "reference":
        return "reference", reference
    if setting == "triton":
        found, reason = _usable(op, "triton", device_type)
        if found is None:
            raise ValueError(f"backend 'triton' cannot run on {device_type} tensors: {reason}")
        return "triton", found
    if setting == "auto" and device_type == "cuda":
        found, _ = _usable(op, "triton", device_type)
        if found is not None:
            return "triton", found
    found, _ = _usable(op, "cpp", device_type)
    if found is not None:
        return "cpp", found
    return "reference", reference


def _chosen(op: str, device_type: str) -> Tuple[str, registry.Kernels]:
    key = (op, device_type, _state["setting"] or get_backend())
    try:
        return _choices[key]
    except KeyError:
        choice = _choices[key] = _choose(*key)
        return choice


def kernels_for(op: str, device_type: str) -> registry.Kernels:
    """The kernels that run ``op`` on ``device_type`` tensors under the current setting."""
    return _chosen(op, device_type)[1]


@torch.compiler.assume_constant_result
def backend_for(op: str, device_type: str) -> str:
    """The backend (``"triton"``, ``"cpp"`` or ``"reference"``) that runs ``op`` on
    ``device_type`` tensors. Under torch.compile the answer is a constant of the traced graph
    (changing the backend afterwards takes effect on the next compilation)."""
    return _chosen(op, device_type)[0]


def resolve_backend(device: Optional[torch.device] = None, op: Optional[str] = None) -> str:
    """The concrete backend (``"triton"``, ``"cpp"`` or ``"reference"``) that runs ``op``
    on ``device``."""
    if op is None or device is None:
        return "reference"
    return backend_for(op, torch.device(device).type)
