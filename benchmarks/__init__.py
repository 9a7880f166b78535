"""The benchmark suite (a package: its shared machinery is imported as ``benchmarks.harness``)."""
import os

# Set here, in the package, so that it happens before torch is loaded however the suite is
# entered (conftest.py, a bench_*.py module, benchmarks.harness), whatever their import order.
# Inductor's parallel compile workers compete with the timed process for the 2 cores;
# compile in-process instead (compile time is excluded from timings anyway).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# OpenMP threads that spin-wait turn any other load on a small shared machine into 10-30×
# slowdowns of every contender (measured: 0.27 ms → 8 ms for the same op); passive waiting
# keeps timings meaningful there at a small cost on tiny ops. BENCH_OMP_WAIT_POLICY=""
# keeps OpenMP's default. Must be set before torch (libgomp) is loaded.
_WAIT = os.environ.get("BENCH_OMP_WAIT_POLICY", "PASSIVE")
if _WAIT:
    os.environ.setdefault("OMP_WAIT_POLICY", _WAIT)
