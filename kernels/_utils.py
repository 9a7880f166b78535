"""Helpers shared by the Triton kernels of gloro_fast (installed as ``gloro_fast.kernels``).

Triton decides at ``@triton.jit`` time whether a kernel is compiled for the GPU or run by
its CPU interpreter (``TRITON_INTERPRET=1``, read from the environment when the kernel
modules are imported). :data:`INTERPRET` records that choice for this process; under the
interpreter the kernels run on CPU tensors, and autotuning is reduced to one config
(benchmarking configs through the interpreter is slow and pointless).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import triton

try:  # triton >= 3.2
    from triton import knobs as _knobs

    INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # pragma: no cover - older triton
    import os

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

__all__ = [
    "INTERPRET",
    "MAX_GRID_X",
    "MAX_GRID_YZ",
    "SUPPORTED_DTYPES",
    "acc_dtype",
    "check_dtype",
    "configs",
    "contiguous",
    "unusable_reason",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# CUDA's grid limits: a launch beyond them fails on a GPU, while the interpreter runs it
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


def configs(candidates: Sequence[triton.Config]) -> List[triton.Config]:
    """Autotuning configs: all of them on a GPU, only the first under the interpreter."""
    candidates = list(candidates)
    return candidates[:1] if INTERPRET else candidates


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a kernel: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """Contiguous memory for a raw-pointer kernel. Gradients often arrive expanded
    (stride 0, e.g. the gradient of ``.sum()``): ``.contiguous()`` materialises them."""
    return t if t.is_contiguous() else t.contiguous()


def check_dtype(name: str, t: torch.Tensor) -> None:
    """The op accepts any floating dtype; the kernels load and store these four."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def unusable_reason(device_type: str) -> "str | None":
    """Why the kernels cannot run on tensors of ``device_type`` in this process (None when
    they can).

    CUDA needs a GPU; CPU needs the interpreter, which must have been on when *triton itself*
    was imported (triton.language's own jit helpers are decorated then) and when these
    kernel modules were imported. Other devices have no Triton kernels here.
    """
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type != "cpu":
        return f"no Triton kernels for {device_type} tensors"
    from triton.language import standard

    language_interpreted = type(standard.zeros_like).__name__ == "InterpretedFunction"
    if not INTERPRET:
        return (
            "gloro_fast.kernels was imported without TRITON_INTERPRET=1 (triton reads it when "
            "kernels are decorated), so the kernels cannot run on CPU in this process"
        )
    if not language_interpreted:
        return (
            "triton was imported before TRITON_INTERPRET=1 was set, so triton.language is not in "
            "interpreter mode; run the kernel tests in a process that sets it first"
        )
    return None
