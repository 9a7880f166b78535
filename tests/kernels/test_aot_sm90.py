"""Triton kernels compiled ahead of time for sm_90 (H100) on this CPU: no GPU needed.

The GPU-only failure modes the interpreter cannot show — a config that spills registers or
takes minutes to compile, 32-bit address arithmetic — are read off the compiler's output
(``gloro_fast.kernels._aot``: ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and the
bundled ``ptxas -v``). It runs in a subprocess: this process has the interpreter on
(gloro_triton_env), which compiles nothing. ``make kernels-check`` sweeps every config of
every kernel; this file checks the ones the review found broken.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import json, os, sys, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gloro-aot-test-")
from gloro_fast.kernels import _aot
want = json.loads(sys.argv[1])
out = {"reports": [], "ttir": {}}
for case in _aot.cases():
    if case.name in want["compile"]:
        out["reports"] += [_aot.compile_case(case, cfg) for cfg in case.configs]
    if case.name in want["ttir"]:
        out["ttir"][case.name] = [_aot.ttir(case, cfg) for cfg in case.configs[:1]]
print(json.dumps(out))
"""


def _run(compile_names, ttir_names):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps({"compile": compile_names, "ttir": ttir_names})],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if proc.returncode != 0:
        if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():  # pragma: no cover
            pytest.skip(f"triton's ptxas is unavailable: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    return _run(
        ["class_distances.gram.fp64", "class_distances.exact.fp64", "bottom_logit.fwd.C256.argmax.fp32",
         "bottom_logit.fwd.C256.argmax.fp64"],
        ["class_distances.gram.fp32", "class_distances.exact.fp32", "class_distances.bwd_s.fp32"],
    )


def test_class_distances_fp64_configs_compile_fast_without_local_memory(compiled):
    """The review measured 130–235 s and 58 KB of local memory per thread for fp64 Gram tiles
    (a 3-D broadcast product); the fp64 MMA dot compiles in about a second."""
    reports = [r for r in compiled["reports"] if r["case"].startswith("class_distances")]
    assert len(reports) == 8
    for r in reports:
        assert r["compile_s"] < 30, r
        assert r["stack_bytes"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_bottom_logit_wide_configs_do_not_spill(compiled):
    """BLOCK_B 32/64 × BLOCK_C 256 spilled registers; the wide-class configs must not."""
    reports = [r for r in compiled["reports"] if r["case"].startswith("bottom_logit")]
    assert len(reports) == 8
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_class_distances_addresses_are_64_bit(compiled):
    """Every integer product in the address arithmetic is int64: rm·d, rm·C and rn·C pass 2³¹
    once C·d or C² does (C·d ≥ 2³¹, or C ≥ 46,341 classes), where int32 products wrap. (The
    offsets added afterwards, k < d and n < C, stay below 2³¹ and may be int32.)"""
    for name, irs in compiled["ttir"].items():
        for ir in irs:
            products = re.findall(r"arith\.muli [^:]*: (?:tensor<[0-9x]*x)?(i\d+)>?", ir)
            assert products, name
            assert set(products) == {"i64"}, (name, sorted(set(products)))
