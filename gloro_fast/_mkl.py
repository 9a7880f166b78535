"""MKL's thread settings for one calling thread, without touching the process's.

``torch.set_num_threads`` also turns MKL's dynamic threading off for the rest of the
process (ATen does so on purpose, for code that sets a thread count once). Every vector-math
call of MKL (``torch.sqrt``, ``torch.exp`` on CPU tensors go through it) then wakes MKL's
whole thread team: with sleeping OpenMP workers (``OMP_WAIT_POLICY=PASSIVE``, what a shared
machine asks for) a 1,024-element square root takes ~70 µs instead of 1.4 µs (2-core Intel
Xeon). So a library must not call it to run one small LAPACK problem on one thread: MKL's
own ``MKL_Set_Num_Threads_Local`` limits MKL on the calling thread only and is undone
exactly. It is reached through the symbols of the loaded torch (MKL is linked into
``libtorch_cpu``); where they are absent (a build without MKL, another platform's library
name) the callers fall back to ``torch.set_num_threads``.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
from typing import Callable, Optional

import torch

__all__ = ["mkl_function"]


@functools.lru_cache(maxsize=None)
def mkl_function(name: str, restype=ctypes.c_int, argtypes=(ctypes.c_int,)) -> Optional[Callable]:
    """MKL's C function ``name`` (by-value arguments: the mixed-case ``MKL_*`` entry points;
    the lowercase ones are Fortran's, which take pointers) in the loaded torch, or None."""
    if not torch.backends.mkl.is_available():
        return None
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "*torch_cpu*"))):
        try:
            fn = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = restype, list(argtypes)
        return fn
    return None
