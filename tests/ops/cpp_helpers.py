"""Shared pieces of the tests of the compiled (C++ CPU) ops: the skip when the extension
lacks an op's kernels, a dispatch log to see which ops a call reached, and a recording
forward kernel. The ``backend``
fixture lives in tests/conftest.py."""
from __future__ import annotations

import contextlib

import pytest
import torch

from gloro_fast.ops import resolve_backend, use_backend

CPU = torch.device("cpu")


# tolerances of the power-iteration ops (compiled against reference)
POWER_ITERATION_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def has_cpu_kernels(op: str) -> bool:
    """Whether the ``cpp`` backend runs ``op`` (and its backward) on CPU tensors."""
    with use_backend("cpp"):
        return resolve_backend(CPU, op) == "cpp"


def requires_cpu_kernels(op: str):
    """Skip marker: ``gloro_fast._C`` must provide CPU kernels of ``op`` and ``op``_backward."""
    return pytest.mark.skipif(not has_cpu_kernels(op), reason=f"gloro_fast._C built without the {op} CPU kernels")


def cpp_op_marks(op: str, single_thread: bool = False):
    """``pytestmark`` of a compiled-op test module: :func:`requires_cpu_kernels`, and the
    ``single_thread`` fixture for ops made of many tiny parallel regions."""
    marks = [requires_cpu_kernels(op)]
    if single_thread:
        marks.append(pytest.mark.usefixtures("single_thread"))
    return marks


def value_iterates_grads(fn, weights, iterates):
    """``fn(ws, iterates) -> (value, new_iterates)`` on fresh leaf copies ``ws`` of
    ``weights``, then ``value.backward()``: returns (value, new_iterates, [dvalue/dw])."""
    ws = [w.clone().requires_grad_(True) for w in weights]
    value, new_us = fn(ws, iterates)
    value.backward()
    return value.detach(), new_us, [w.grad for w in ws]




@contextlib.contextmanager
def recording_forward(op: str, backend: str, record):
    """Within the block, ``op``'s ``backend`` forward kernel calls ``record(*args)`` first
    (registered through the registry, so that choices already cached are made again); the
    original kernels are registered back on exit."""
    from gloro_fast.ops import registry

    original = registry.kernels(op, backend)

    def forward(*args):
        record(*args)
        return original.forward(*args)

    registry.register_kernels(op, backend, forward, original.backward, original.unusable)
    try:
        yield
    finally:
        registry.register_kernels(op, backend, original.forward, original.backward, original.unusable)


def compiled_certify(model, x) -> torch.Tensor:
    """``model.certify(x)`` through a fresh ``torch.compile(fullgraph=True)`` with Inductor's
    caches off (a graph compiled before an op's tags changed would be reused as it was)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    try:
        with inductor_config.patch(force_disable_caches=True):
            return torch.compile(model.certify, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
