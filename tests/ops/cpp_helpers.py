"""Shared pieces of the tests of the compiled (C++ CPU) ops: the skip when the extension
lacks an op's kernels, and a dispatch log to see which ops a call reached. The ``backend``
fixture lives in tests/conftest.py."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gloro_fast.ops._extension import has_kernel

CPU = torch.device("cpu")


def requires_cpu_kernels(op: str):
    """Skip marker: ``gloro_fast._C`` must provide CPU kernels of ``op`` and ``op``_backward."""
    return pytest.mark.skipif(
        not (has_kernel(op, CPU) and has_kernel(f"{op}_backward", CPU)),
        reason=f"gloro_fast._C built without the {op} CPU kernels",
    )


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched inside the block (``log.names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
