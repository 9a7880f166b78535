"""The backend table: which kernels implement each op, per backend.

Every op is ONE ``torch.library`` op (``torch.ops.gloro_fast.<op>`` and its backward
``<op>_backward``: one schema, one fake, one autograd formula, defined in
``gloro_fast/ops/<op>.py``). Its implementation looks up here the kernels of the backend
selected for the tensors' device (``gloro_fast.ops.use_backend``); the kernels themselves
come from providers, each registering, per op, a forward and a backward with exactly the
op's and the backward op's schema signatures:

- ``reference``: the pure-PyTorch spec (``gloro_fast/ops/<op>.py``), on any device;
- ``cpp``: the C++ CPU and CUDA kernels of ``gloro_fast._C`` (``csrc/``), registered by
  ``gloro_fast/ops/_extension.py`` when the extension loads;
- ``triton``: the Triton kernels (``kernels/``, installed as ``gloro_fast.kernels``),
  registered when their module is imported.

This module imports nothing from gloro_fast: ops and providers both depend on it, never on
each other's internals.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

__all__ = ["Kernels", "kernels", "on_change", "register_kernels", "runs_anywhere"]


def runs_anywhere(device_type: str) -> Optional[str]:
    """``unusable`` of kernels written in torch ops: they run on every device."""
    return None


class Kernels(NamedTuple):
    """One backend's implementation of one op.

    ``forward`` and ``backward`` take and return exactly what the op's schema and its
    backward's schema say (arguments already checked by the op). ``unusable(device_type)``
    says why they cannot run on that device type in this process (None when they can).
    """

    forward: Callable
    backward: Callable
    unusable: Callable[[str], Optional[str]] = runs_anywhere


_KERNELS: Dict[Tuple[str, str], Kernels] = {}
_LISTENERS: List[Callable[[], None]] = []


def register_kernels(op: str, backend: str, forward: Callable, backward: Callable,
                     unusable: Callable[[str], Optional[str]] = runs_anywhere) -> None:
    """Make ``forward``/``backward`` the ``backend`` implementation of ``op`` (replacing any
    earlier one); choices already made from the table are made again."""
    _KERNELS[(op, backend)] = Kernels(forward, backward, unusable)
    for listener in _LISTENERS:
        listener()


def kernels(op: str, backend: str) -> Optional[Kernels]:
    """The registered implementation of ``op`` by ``backend``, or None."""
    return _KERNELS.get((op, backend))


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every registration (e.g. to drop a cache of choices)."""
    _LISTENERS.append(listener)
