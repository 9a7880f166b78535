"""Per-call dispatch overhead: what the op adds to its kernel, on inputs so small that the
kernel itself takes microseconds (the margin path at C = 10 is such a call).

Contenders, all on the ``cpp`` backend:
- kernel: the compiled kernel alone, as the backend table holds it;
- op: ``torch.ops.gloro_fast.<op>``: the dispatcher, the op's autograd kernel (which, for a
  call that builds no graph on plain CPU/CUDA tensors, reads the backend choice — a
  dictionary lookup made once per op, device type and setting — and runs the kernel below
  autograd without a second crossing into Python) and the kernel;
- public: ``gloro_fast.ops.<op>``: the op's argument check (host syncs for the value checks),
  the backend choice, then the op.

The dispatch overhead is op − kernel (target ≤ 10 µs); public − op is the argument check.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.harness import DEVICE, QUICK, record_skip, run_case
from gloro_fast import ops
from gloro_fast._mkl import mkl_function
from gloro_fast.ops import registry

CONTENDERS = ("kernel", "op", "public")
ROUNDS = 300 if QUICK else 1000  # single calls of a few µs: many rounds for a stable median


def _inputs(op: str):
    """(public call, op arguments) of a small call of ``op``; no input requires grad."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    if op == "bottom_logit":
        f, d, k = rand(32, 10), rand(10, 10).abs(), torch.tensor(1.0, device=DEVICE)
        return (lambda: ops.bottom_logit(f, d, k, 0.1)), (f, d, k, 0.1, None)
    if op == "class_distances":
        w = rand(10, 64)
        return (lambda: ops.class_distances(w)), (w, False)
    if op == "power_iteration_linear":
        ws, us = [rand(64, 64)], [torch.nn.functional.normalize(rand(64), dim=0)]
        return (lambda: ops.power_iteration_linear(ws, us, 1)), (ws, us, 1)
    w, u = rand(8, 8, 3, 3), torch.nn.functional.normalize(rand(1, 8 * 8 * 8), dim=1).reshape(1, 8, 8, 8)
    return (lambda: ops.power_iteration_conv(w, u, 1, padding=1)), (w, u, 1, [1, 1], [1, 1, 1, 1], [1, 1], 1, False)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("op", ["bottom_logit", "class_distances", "power_iteration_linear", "power_iteration_conv"])
def test_dispatch(benchmark, op, contender, single_op_thread):
    case = f"dispatch {op}"
    with ops.use_backend("cpp"):
        if ops.resolve_backend(DEVICE, op) != "cpp":
            record_skip(case, contender, "no compiled kernel for this device")
        public, args = _inputs(op)
        if contender == "kernel":
            kernel = registry.kernels(op, "cpp").forward
            fn = lambda: kernel(*args)  # noqa: E731
        elif contender == "op":
            the_op = getattr(torch.ops.gloro_fast, op).default
            fn = lambda: the_op(*args)  # noqa: E731
        else:
            fn = public
        run_case(benchmark, fn, case=case, contender=contender, params={"op": op}, size=None,
                 measure_memory=False, min_rounds=ROUNDS, extra={"op": "dispatch", "mode": "fwd"})


@pytest.fixture
def single_op_thread():
    """One intra-op thread: the overhead, not the threading of a microsecond kernel."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    # torch.set_num_threads left MKL's dynamic threading off for the rest of the run (every
    # later torch.sqrt would wake MKL's thread team: gloro_fast._mkl); the harness sets no
    # thread count unless BENCH_THREADS asks, so the process had it on
    set_dynamic = mkl_function("MKL_Set_Dynamic", restype=None)
    if set_dynamic is not None and not os.environ.get("BENCH_THREADS"):
        set_dynamic(1)
