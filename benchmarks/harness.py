"""Shared machinery of the gloro_fast benchmark suite (pytest-benchmark).

Every case is one (op or model step, parameters, mode) and is timed once per *contender*:

- ``naive``: the literal form of public GloRo/LiResNet code (B×C×d margins, per-layer
  eager power iteration with autograd through the iterations),
- ``eager``: a careful hand-written eager PyTorch version,
- ``compile``: ``torch.compile`` of that eager version (compiled once per case during
  warm-up; compile time is never timed),
- ``gloro_fast[<backend>]``: the package's public API on each available backend
  (``reference``; ``cpp`` once ``gloro_fast._C`` provides the kernel, ``cuda`` /
  ``triton`` on a GPU). A backend whose kernels are not built is skipped, never timed
  under a false name.

Timings are pytest-benchmark's (``benchmark.pedantic``); each record carries in
``extra_info`` the case, contender, problem size, peak memory of one call and notes,
which ``benchmarks/report.py`` turns into ``results/<device>.json``, ``RESULTS.md`` and plots.

Environment: ``BENCH_QUICK=1`` (smaller grid, fewer rounds: ``make bench-quick``),
``BENCH_DEVICE`` (default: cuda when present, else cpu), ``BENCH_NAIVE_CAP_GB`` (memory cap
of the naive B×C×d contender, default 4), ``BENCH_THREADS``; ``TORCHINDUCTOR_COMPILE_THREADS`` and
``OMP_WAIT_POLICY`` are set by ``benchmarks/__init__.py``, before torch is loaded.
conftest.py holds only the pytest hooks and fixtures; the bench_*.py modules import from here.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import pytest
import torch

import gloro_fast
from gloro_fast import ops as gops

QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
if os.environ.get("BENCH_THREADS"):  # default: torch's own choice (one per core)
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
DEVICE = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
NAIVE_CAP_BYTES = float(os.environ.get("BENCH_NAIVE_CAP_GB", "4")) * 2**30
# above this many B×C×d (or C×C×d) elements the (chunked) naive form is not run at all:
# it would take minutes per case on a small CPU
NAIVE_MAX_ELEMENTS = float(os.environ.get("BENCH_NAIVE_MAX_ELEMENTS", "1.1e9"))
DTYPE = torch.float32

# timing policy: rounds = time budget / one call, clamped
TIME_BUDGET_S = 0.4 if QUICK else 1.0
MIN_ROUNDS = 3 if QUICK else 5
MAX_ROUNDS = 40 if QUICK else 200
SLOW_CALL_S = 1.0  # calls slower than this get 2 (quick) / 3 (full) rounds only
VERY_SLOW_CALL_S = 3.0  # and in quick mode, calls slower than this get 1 round

RAW_DIR = os.path.join(os.path.dirname(__file__), ".raw")

try:  # torch.compile's defaults (automatic dynamic shapes after a recompile), enough cache
    import torch._dynamo

    for _name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, _name):
            setattr(torch._dynamo.config, _name, 256)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
except Exception:  # pragma: no cover - compile contenders then fail/skip individually
    pass


# -- device -----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def device_name(device: torch.device = DEVICE) -> str:
    """e.g. ``cpu-Intel-R-Xeon-R-Processor-2cores`` or ``cuda-NVIDIA-H100-80GB-HBM3``
    (sanitised for file names)."""
    if device.type == "cuda":
        raw = f"cuda-{torch.cuda.get_device_name(device)}"
    else:
        raw = f"cpu-{_cpu_model()}-{_cores()}cores"
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9.]+", "-", raw)).strip("-")


DEVICE_NAME = device_name()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# -- contenders -------------------------------------------------------------------------
def backend_label(backend: str) -> str:
    if backend == "cpp" and DEVICE.type == "cuda":
        return "gloro_fast[cuda]"
    return f"gloro_fast[{backend}]"


def gloro_backends() -> List[str]:
    """Every named gloro_fast backend (``auto`` is only a policy over these)."""
    return [b for b in gops.BACKENDS if b != "auto"]


def backend_status(backend: str, op_names: Iterable[str]) -> Dict[str, str]:
    """Which concrete backend each op resolves to when ``backend`` is selected."""
    out = {}
    with gops.use_backend(backend):
        for op in op_names:
            try:
                out[op] = gops.resolve_backend(DEVICE, op)
            except Exception as exc:  # e.g. triton on a CPU tensor outside the interpreter
                out[op] = f"unavailable ({exc})"
    return out


def contenders(extra: Sequence[str] = (), naive: bool = True, eager: bool = True,
               compile: bool = True) -> List[str]:
    """Contender ids for a case: naive, eager, compile, gloro_fast backends (+ extra)."""
    names = list(extra)
    if naive:
        names.append("naive")
    if eager:
        names.append("eager")
    if compile:
        names.append("compile")
    names += [f"gloro_fast:{b}" for b in gloro_backends()]
    return names


@contextlib.contextmanager
def contender_backend(backend: str, op_names: Iterable[str]):
    """Select ``backend`` for the duration; skip the contender if none of ``op_names``
    has a kernel of that backend on this device (it would silently run the reference)."""
    status = backend_status(backend, op_names)
    reason = None
    if backend == "triton" and DEVICE.type != "cuda":
        reason = "Triton runs on CPU only under its interpreter (a test tool, not a performance path)"
    elif backend != "reference" and not any(v == backend for v in status.values()):
        reason = ("no kernel for this device: " +
                  "; ".join(sorted({v if v.startswith("unavailable") else "would resolve to reference"
                                    for v in status.values()})))
    if reason is not None:
        _SKIPS.append({"contender": backend_label(backend), "ops": sorted(status), "reason": reason})
        pytest.skip(f"{backend_label(backend)} ({sorted(status)} on {DEVICE.type}): {reason}")
    with gops.use_backend(backend):
        yield status


_COMPILED: Dict[object, Callable] = {}


def compiled(key, fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn)``, created once per key for the whole session."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **kwargs)
    return _COMPILED[key]


# -- memory -----------------------------------------------------------------------------
def peak_memory(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes allocated above the live set at call start, during one call of ``fn``.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the allocation/free events of torch's
    CPU allocator recorded by ``torch.profiler(profile_memory=True)``, replayed in time order
    (tensor memory of every engine that allocates through torch, compiled code included).
    """
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        sync()
        return int(torch.cuda.max_memory_allocated(DEVICE) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # pragma: no cover - profiler internals moved
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


def rss_bytes() -> int:
    """Resident set size now (Linux), for the session summary."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover
        return 0


# -- running a case ---------------------------------------------------------------------
_SKIPS: List[dict] = []
_LOAD_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_case(benchmark, fn: Callable[[], object], *, case: str, contender: str, params: dict,
             size: float, setup: Optional[Callable[[], None]] = None, note: str = "",
             measure_memory: bool = True, extra: Optional[dict] = None,
             compile_warmup: Optional[bool] = None, min_rounds: Optional[int] = None) -> None:
    """Warm up (compiles happen here), measure one call's peak memory, then time ``fn``.

    ``case`` names the comparison group (all contenders of one case share it), ``size`` is
    the x-axis of the speed-up plots. ``setup`` (untimed) runs before every call.
    ``min_rounds`` raises the round count of cases whose ratios are targets close to 1.
    """
    if compile_warmup is None:
        compile_warmup = contender == "compile"

    def call():
        out = fn()
        sync()
        return out

    def prepared(callable_):
        if setup is not None:
            setup()
        return callable_()

    peak = None
    t0 = time.perf_counter()
    if measure_memory and not compile_warmup:
        # the warm-up call is also the memory measurement (saves a call of slow contenders)
        if setup is not None:
            setup()
        peak = peak_memory(call)
    else:
        prepared(call)  # warm-up: compilation, caches, first-touch of buffers
    first = time.perf_counter() - t0
    one = first
    if compile_warmup or first < 0.2:
        # a second untimed call: the first one compiled, or was too short to trust
        t0 = time.perf_counter()
        if measure_memory and peak is None:
            if setup is not None:
                setup()
            peak = peak_memory(call)
        else:
            prepared(call)
        one = time.perf_counter() - t0
    if one >= VERY_SLOW_CALL_S and QUICK:
        rounds = 1
    elif one >= SLOW_CALL_S:
        rounds = 2 if QUICK else 3
    else:
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TIME_BUDGET_S / max(one, 1e-6))))
    if min_rounds is not None:
        rounds = max(rounds, min_rounds)
    benchmark.group = case
    benchmark.extra_info.update({
        "case": case,
        "contender": contender,
        "params": params,
        "size": size,
        "peak_bytes": peak,
        "first_call_s": first,
        "note": note,
        "device": DEVICE_NAME,
        "quick": QUICK,
    })
    if extra:
        benchmark.extra_info.update(extra)
    if setup is not None:
        benchmark.pedantic(call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)


def run_paired(benchmark, ours: Callable[[], object], theirs: Callable[[], object], *, case: str,
               contender: str, params: dict, size: float, pairs: int, extra: dict) -> dict:
    """Time ``ours`` and ``theirs`` as interleaved pairs (the order alternating from pair to
    pair, so that a shared machine's drifting load hits both alike) and record the median of
    the per-pair throughput ratios theirs time / ours time, with its quartiles, under
    ``extra_info["paired"]`` (what report.py reads for targets near 1). Returns that record."""
    ratios: List[float] = []

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def pair():
        if len(ratios) % 2:
            t_ours, t_theirs = timed(ours), timed(theirs)
        else:
            t_theirs, t_ours = timed(theirs), timed(ours)
        ratios.append(t_theirs / t_ours)

    for fn in (ours, theirs, ours, theirs):  # warm-up: compilation, caches
        fn()
    sync()
    ratios.clear()
    run_case(benchmark, pair, case=case, contender=contender, params=params, size=size,
             min_rounds=pairs, measure_memory=False, extra=extra)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    record = {"ratio_median": statistics.median(ratios), "q1": q[0], "q3": q[2],
              "min": min(ratios), "max": max(ratios), "pairs": len(ratios)}
    benchmark.extra_info["paired"] = record
    return record


def run_contender(benchmark, fn: Callable[[], object], raw_contender: str, op_names: Iterable[str],
                  prepare: Optional[Callable[[], None]] = None, **kw) -> None:
    """:func:`run_case` for the raw contender name: a ``gloro_fast:<backend>`` contender
    runs inside :func:`contender_backend` (recording what each op resolved to), after the untimed
    ``prepare()``; any other contender runs as it is."""
    if not raw_contender.startswith("gloro_fast:"):
        run_case(benchmark, fn, **kw)
        return
    with contender_backend(raw_contender.split(":", 1)[1], op_names) as status:
        if prepare is not None:
            prepare()
        kw["extra"]["resolved"] = status
        run_case(benchmark, fn, **kw)


def label(contender: str) -> str:
    """Display name of a contender id (``gloro_fast:cpp`` → ``gloro_fast[cpp]``)."""
    if contender.startswith("gloro_fast:"):
        return backend_label(contender.split(":", 1)[1])
    return contender


def pick(full, quick):
    """The full grid in ``make bench``, the quick one in ``make bench-quick``."""
    return quick if QUICK else full


def zero_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def record_skip(case: str, contender: str, reason: str) -> None:
    """Note a contender left out of a case (shown in the report), then skip the test."""
    _SKIPS.append({"case": case, "contender": contender, "reason": reason})
    pytest.skip(f"{contender} @ {case}: {reason}")


# -- session metadata -------------------------------------------------------------------
ALL_OPS = ("class_distances", "bottom_logit", "power_iteration_linear", "power_iteration_conv")


def session_metadata() -> dict:
    """What report.py needs to know about the run: device, versions, threads, the backend each
    op resolved to, the contenders skipped (and why), the load average at start and end."""
    return {
        "device": DEVICE_NAME,
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "gloro_fast": getattr(gloro_fast, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "cores": _cores(),
        "quick": QUICK,
        "naive_cap_bytes": NAIVE_CAP_BYTES,
        "backends": {b: backend_status(b, ALL_OPS) for b in gloro_backends()},
        # whether the compiled kernels run here (the report warns when they do not)
        "extension_loaded": any(v == "cpp" for v in backend_status("cpp", ALL_OPS).values()),
        "skips": _dedupe(_SKIPS),
        "loadavg_start": _LOAD_START,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "final_rss_bytes": rss_bytes(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_session_metadata(benchmark_json=None) -> str:
    """Write :func:`session_metadata` beside the pytest-benchmark JSON (``<raw>.meta.json``,
    where report.py looks for it), or under ``benchmarks/.raw/`` without one; returns the path.
    ``benchmark_json`` is the ``--benchmark-json`` option as pytest holds it (path or file)."""
    raw = benchmark_json
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    elif raw is not None and not isinstance(raw, str):
        raw = getattr(raw, "name", None)
    if isinstance(raw, str) and raw.endswith(".json"):
        path = raw[:-5] + ".meta.json"
    else:
        os.makedirs(RAW_DIR, exist_ok=True)
        path = os.path.join(RAW_DIR, f"{DEVICE_NAME}{'-quick' if QUICK else ''}.meta.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(session_metadata(), fh, indent=1)
    return path


def _dedupe(items: List[dict]) -> List[dict]:
    seen, out = set(), []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
