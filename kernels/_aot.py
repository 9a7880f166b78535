"""Ahead-of-time compilation of every Triton kernel config for a GPU target, no GPU needed.

    python -m gloro_fast.kernels._aot [--arch 90] [--only NAME] [--json FILE]
                                      [--max-seconds 60] [--max-local-bytes 0]

compiles each autotuning config of each kernel (and each dtype it is launched with) with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, runs the bundled ``ptxas -v`` on
its PTX, and reports compile time, registers, spill stores/loads and the local-memory
stack frame. Exit status 1 when a config exceeds ``--max-seconds`` or spills / uses more
local memory than ``--max-local-bytes``: a config that spills or takes minutes to compile
on a GPU is found here, before any GPU sees it (``make kernels-check`` runs this).

Must run in a process where ``TRITON_INTERPRET`` is unset (the interpreter keeps only the
first config of each kernel and compiles nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

__all__ = ["Case", "cases", "compile_case", "main"]

_TRITON_TYPE = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


class Case:
    """One kernel launch shape: the (autotuned) kernel, its argument types, fixed constexprs."""

    def __init__(self, name: str, kernel, signature: Dict[str, str], constexprs: Dict[str, object],
                 configs: Optional[List[triton.Config]] = None):
        self.name = name
        self.kernel = kernel
        self.signature = signature
        self.constexprs = constexprs
        self.configs = configs if configs is not None else list(getattr(kernel, "configs", [None]))

    @property
    def fn(self):
        """The JITFunction (under an Autotuner, its ``fn``; a JITFunction's own ``fn`` is the
        Python function)."""
        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel


def _ptr(dtype: str) -> str:
    return _TRITON_TYPE[dtype]


def cases() -> Iterator[Case]:
    """Every kernel of gloro_fast.kernels with the dtypes its launchers use."""
    from . import bottom_logit as bl
    from . import class_distances as cd
    from . import power_iteration_conv as pc
    from . import power_iteration_linear as pl

    for dt in ("fp32", "bf16", "fp64"):
        acc = "fp64" if dt == "fp64" else "fp32"
        fp64 = dt == "fp64"
        yield Case(f"class_distances.gram.{dt}", cd.GRAM_KERNELS[fp64],
                   {"w_ptr": _ptr(dt), "mean_ptr": _ptr(acc), "out_ptr": _ptr(dt), "C": "i32", "d": "i32"},
                   {"FP64": fp64})
        yield Case(f"class_distances.exact.{dt}", cd.EXACT_KERNELS[fp64],
                   {"w_ptr": _ptr(dt), "out_ptr": _ptr(dt), "C": "i32", "d": "i32"}, {"FP64": fp64})
        yield Case(f"class_distances.bwd_s.{dt}", cd.BACKWARD_S_KERNELS[fp64],
                   {"g_ptr": _ptr(dt), "d_ptr": _ptr(dt), "s_ptr": _ptr(acc), "rowsum_ptr": _ptr(acc), "C": "i32"},
                   {"FP64": fp64})
        for block_c in (32, 256):
            for has_classes in (False, True):
                kernel = bl.forward_kernel(block_c)
                yield Case(f"bottom_logit.fwd.C{block_c}.{'cls' if has_classes else 'argmax'}.{dt}", kernel,
                           {"f_ptr": _ptr(dt), "d_ptr": _ptr(dt), "ek_ptr": _ptr(acc), "cls_ptr": "*i64",
                            "fbot_ptr": _ptr(dt), "istar_ptr": "*i64", "j_ptr": "*i64", "B": "i32", "C": "i32"},
                           {"HAS_CLASSES": has_classes, "FP64": fp64, "BLOCK_C": block_c})
            yield Case(f"bottom_logit.bwd.C{block_c}.{dt}", bl.backward_kernel,
                       {"g_ptr": _ptr(dt), "istar_ptr": "*i64", "j_ptr": "*i64", "d_ptr": _ptr(dt),
                        "ek_ptr": _ptr(acc), "gf_ptr": _ptr(dt), "gd_ptr": _ptr(acc), "gk_part_ptr": _ptr(acc),
                        "B": "i32", "C": "i32"},
                       {"FP64": fp64, "ATOMIC_D": True, "BLOCK_B": bl.BACKWARD_BLOCK_B, "BLOCK_C": block_c},
                       configs=[triton.Config({}, num_warps=4)])
        yield Case(f"power_iteration_linear.fwd.{dt}", pl.forward_kernel,
                   {"w_ptr": _ptr(dt), "u_in_ptr": _ptr(dt), "meta_ptr": "*i64", "u_out_ptr": _ptr(dt),
                    "sigma_ptr": _ptr(dt), "v_ptr": _ptr(acc), "cur_ptr": _ptr(acc), "t_ptr": _ptr(acc),
                    "n_iter": "i32", "L": "i32", "MAX_M": "i32", "MAX_N": "i32"},
                   {"FP64": fp64})
        yield Case(f"power_iteration_linear.bwd.{dt}", pl.backward_kernel,
                   {"g_ptr": _ptr(dt), "sigma_ptr": _ptr(dt), "v_ptr": _ptr(acc), "u_ptr": _ptr(dt),
                    "meta_ptr": "*i64", "gw_ptr": _ptr(dt), "layer0": "i32"},
                   {"FP64": fp64, "BLOCK": pl.BACKWARD_BLOCK}, configs=[triton.Config({}, num_warps=4)])
        yield Case(f"power_iteration_conv.normalize.{dt}", pc.normalize_segments_kernel,
                   {"x_ptr": _ptr(dt), "old_ptr": _ptr(dt), "out_ptr": _ptr(dt), "seg_len": "i32"}, {"FP64": fp64})
        yield Case(f"power_iteration_conv.norms.{dt}", pc.segment_norms_kernel,
                   {"y_ptr": _ptr(dt), "out_ptr": _ptr(dt), "seg_len": "i32"}, {"FP64": fp64})
        yield Case(f"power_iteration_conv.scale.{dt}", pc.scale_segments_kernel,
                   {"y_ptr": _ptr(dt), "g_ptr": _ptr(dt), "sigma_ptr": _ptr(dt), "out_ptr": _ptr(dt),
                    "seg_len": "i32", "seg0": "i32"}, {"FP64": fp64})


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_path(arch: int) -> str:
    """The ptxas that ``triton.compile`` itself uses for this arch (its PTX version matches)."""
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(arch).path
    except TypeError:  # triton without per-arch ptxas
        return nv.get_ptxas().path


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w", encoding="utf-8") as fh:
            fh.write(ptx)
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run(
            [_ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    out = {}
    for key, pattern in _PTXAS_RE.items():
        found = pattern.search(proc.stderr)
        out[key] = int(found.group(1)) if found else 0
    return out


def compile_case(case: Case, config: Optional[triton.Config], arch: int = 90) -> dict:
    """Compile one config of one case for sm_<arch>; returns the measurements."""
    kwargs = dict(config.kwargs) if config is not None else {}
    constexprs = {**case.constexprs, **kwargs}
    signature = dict(case.signature)
    for name in constexprs:
        signature[name] = "constexpr"
    options = {}
    if config is not None:
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    start = time.perf_counter()
    src = ASTSource(fn=case.fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    report = {"case": case.name, "config": kwargs, "num_warps": options.get("num_warps"),
              "num_stages": options.get("num_stages"), "compile_s": round(seconds, 2),
              "shared_bytes": compiled.metadata.shared}
    report.update(_ptxas_report(compiled.asm["ptx"], arch))
    return report


def ttir(case: Case, config: Optional[triton.Config] = None, arch: int = 90) -> str:
    """The Triton IR of one config of a case (for checks on the generated code)."""
    constexprs = {**case.constexprs, **(dict(config.kwargs) if config is not None else {})}
    signature = dict(case.signature)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=case.fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ttir"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--json", default=None, help="write the reports here")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--max-local-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels._aot: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    # a cold cache of our own: a compile time read from Triton's cache would be ~0
    cache = tempfile.TemporaryDirectory(prefix="gloro-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    reports, failures = [], []
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        for config in case.configs:
            rep = compile_case(case, config, args.arch)
            reports.append(rep)
            local = max(rep["stack_bytes"], rep["spill_stores"], rep["spill_loads"])
            bad = rep["compile_s"] > args.max_seconds or local > args.max_local_bytes
            if bad:
                failures.append(rep)
            print(f"{'FAIL' if bad else 'ok  '} {rep['case']:<42} {json.dumps(rep['config']):<44} "
                  f"w{rep['num_warps']} s{rep['num_stages']} {rep['compile_s']:6.2f}s "
                  f"regs {rep['registers']:3d} stack {rep['stack_bytes']} spill {rep['spill_stores']}/"
                  f"{rep['spill_loads']} smem {rep['shared_bytes']}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(reports, fh, indent=1)
    print(f"{len(reports)} configs compiled for sm_{args.arch}, {len(failures)} over the limits "
          f"({args.max_seconds:g} s, {args.max_local_bytes} bytes of local memory)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
