"""Turn a pytest-benchmark JSON run of the suite into the published results.

    python benchmarks/report.py --raw benchmarks/.raw/bench.json --out benchmarks

reads the pytest-benchmark file (``--benchmark-json``) and the run's metadata written by
benchmarks/harness.py beside it (``<raw>.meta.json``: device, backends, skipped contenders), and writes

- ``<out>/results/<device>.json``: every case × contender (median, IQR, rounds, peak memory,
  speed-ups) and the targets,
- ``<out>/RESULTS.md``: the tables (speed-up = time of the reference contender / time of
  the row; > 1 is faster) and the "Targets" section, met or missed, with the ratios,
- ``<out>/results/<device>-<op>.png``: speed-up vs problem size per op (matplotlib, Agg).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

BASELINES = ("naive", "eager", "compile")
OP_TITLES = OrderedDict([
    ("margin_path", "Margin path: class_distances + bottom_logit + CE([f, f_⊥], y)"),
    ("class_distances", "class_distances alone"),
    ("power_iteration_linear", "power_iteration_linear"),
    ("power_iteration_conv", "power_iteration_conv"),
    ("lipschitz_step", "Lipschitz-bound step (K = Π σ̂ and its backward)"),
    ("training_step", "Training step (forward, TRADES loss, backward, Adam) vs plain"),
    ("certify", "Certify vs plain inference"),
    ("convergence", "Convergence of the evaluation bounds (tol 1e-6)"),
    ("export", "Frozen / exported model (gloro_fast.export) vs the plain network"),
    ("export_paired", "Frozen model vs the plain network, paired rounds (time of one pair)"),
    ("export_paired_cl", "Frozen model vs the plain network in channels_last (weights and input), paired rounds "
                         "(time of one pair)"),
    ("layer_paired", "gloro_fast.nn layers vs their torch.nn equivalents, paired rounds (time of one pair)"),
    ("certify_paired", "Certify (sound, bounds cached) vs the plain network's forward, paired rounds"),
    ("certify_small_paired", "Certify (sound, bounds cached) vs the plain network's forward at small batches, "
                             "paired rounds (no target yet)"),
    ("certify_paired_cl", "Certify (sound, bounds cached) vs the plain network's forward in channels_last "
                          "(weights and input), paired rounds"),
    ("training_paired", "GloRo training step vs the plain network's step, paired rounds"),
    ("minmax_norm_paired", "minmax_norm (MinMax + per-sample sums of squares, fused) vs MinMax then the norms, "
                           "paired rounds"),
    ("same_bits_paired", "same_bits (the CPU stale-bound guard's comparison) vs a torch.equal loop, paired rounds"),
    ("guard_share", "The stale-bound guard's time as a share of certify's, paired rounds"),
    ("sound_decision_paired", "sound_decision (the sound test in one op) vs its torch-op reference, paired rounds"),
    ("norm_basis_paired", "norm_basis (the allowance's basis from the recorded norms in one op) vs its torch-op "
                          "reference, paired rounds"),
    ("blocked_linear_reference", "blocked_linear (the certifying dense layer, C++: product, then the blocks' tree "
                                 "and the bias in one pass) vs its torch-op reference, paired rounds"),
    ("blocked_linear_linear", "blocked_linear vs F.linear (the unblocked layer: the floor), paired rounds"),
    ("dispatch", "Dispatch overhead: the op vs its kernel (cpp backend, microsecond-sized calls)"),
])
MODE_NOTES = {
    "margin_path": "`fwd`: no autograd (certification); `fwd+bwd`: loss and its backward into f, W, K.",
    "class_distances": "`fwd`: no autograd; `fwd+bwd`: ⟨D, G⟩ and its backward into W.",
    "power_iteration_linear": "`fwd`: training forward (autograd records σ̂); `fwd+bwd`: + backward of Σσ̂.",
    "power_iteration_conv": "`fwd`: training forward (autograd records σ̂); `fwd+bwd`: + backward of Σσ̂.",
    "dispatch": "`kernel`: the compiled kernel alone; `op`: `torch.ops.gloro_fast.<op>` (autograd layer, backend "
                "table, kernel); `public`: `gloro_fast.ops.<op>` (+ the argument check). "
                "Dispatch overhead = op − kernel.",
}


# -- loading ------------------------------------------------------------------------------
def load(raw_path: str, meta_path: Optional[str]):
    with open(raw_path, encoding="utf-8") as fh:
        raw = json.load(fh)
    meta = {}
    if meta_path and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    rows = []
    for bench in raw.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats", {})
        if "case" not in info:
            continue
        rows.append({
            "case": info["case"],
            "op": info.get("op", "?"),
            "mode": info.get("mode", ""),
            "contender": info["contender"],
            "params": info.get("params", {}),
            "size": info.get("size"),
            "median_s": stats.get("median"),
            "iqr_s": stats.get("iqr"),
            "min_s": stats.get("min"),
            "rounds": stats.get("rounds"),
            "peak_bytes": info.get("peak_bytes"),
            "first_call_s": info.get("first_call_s"),
            "note": info.get("note", ""),
            "resolved": info.get("resolved"),
            "paired": info.get("paired"),
        })
    if not meta.get("device") and rows:
        meta["device"] = raw["benchmarks"][0]["extra_info"].get("device", "unknown")
    meta.setdefault("machine_info", {k: raw.get("machine_info", {}).get(k)
                                     for k in ("cpu", "python_version", "system") if k in raw.get("machine_info", {})})
    return rows, meta


def add_ratios(rows: List[dict]) -> None:
    by_case: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_case[row["case"]][row["contender"]] = row
    for row in rows:
        case = by_case[row["case"]]
        for base in BASELINES + ("plain",):
            ref = case.get(base)
            key = f"speedup_vs_{base}"
            row[key] = (ref["median_s"] / row["median_s"]) if ref and row["median_s"] else None


# -- targets ------------------------------------------------------------------------------
def _find(rows, **match):
    out = []
    for row in rows:
        if all((row.get(k) == v) if k != "params" else all(row["params"].get(pk) == pv for pk, pv in v.items())
               for k, v in match.items()):
            out.append(row)
    return out


def _gloro_rows(rows):
    return [r for r in rows if r["contender"].startswith("gloro_fast[")]


def compute_targets(rows: List[dict]) -> List[dict]:
    targets = []

    def add(name, contender, value, threshold, kind, detail, info=False, unit="×"):
        if value is None:
            verdict = "not measured"
        elif info:
            verdict = "info"
        else:
            verdict = "met" if (value >= threshold if kind == ">=" else value <= threshold) else "missed"
        targets.append({"target": name, "contender": contender, "value": value, "threshold": threshold,
                        "kind": kind, "verdict": verdict, "detail": detail, "unit": unit})

    # 1. margin path fwd+bwd at B=512, C=1000, d=2048
    point = {"B": 512, "C": 1000, "d": 2048}
    case_rows = _find(rows, op="margin_path", mode="fwd+bwd", params=point)
    naive = next((r for r in case_rows if r["contender"] == "naive"), None)
    gl = _gloro_rows(case_rows) or [None]
    for r in gl:
        name = r["contender"] if r else "gloro_fast"
        detail = "margin path fwd+bwd, B=512 C=1000 d=2048"
        if naive and naive.get("note"):
            detail += f"; naive {naive['note']}"
        add("margin path fwd+bwd ≥ 20× vs literal naive", name, r and r["speedup_vs_naive"], 20.0, ">=", detail)
        add("margin path fwd+bwd ≥ 1.5× vs torch.compile(eager)", name, r and r["speedup_vs_compile"], 1.5, ">=",
            "margin path fwd+bwd, B=512 C=1000 d=2048")

    # 2. Lipschitz-bound step of cnn_6C2F ≥ 3× vs the naive loop
    same = _find(rows, op="lipschitz_step", params={"model": "6C2F", "n_iter": 10})
    default = _find(rows, op="lipschitz_step", params={"model": "6C2F", "n_iter": 1})
    naive10 = next((r for r in same if r["contender"] == "naive"), None)
    for r in _gloro_rows(same) or [None]:
        add("Lipschitz-bound step of cnn_6C2F ≥ 3× vs naive loop", r["contender"] if r else "gloro_fast",
            r and r["speedup_vs_naive"], 3.0, ">=",
            "same work: 10 power iterations per layer for both (naive: autograd through them)")
    for r in _gloro_rows(default):
        value = naive10["median_s"] / r["median_s"] if naive10 else None
        add("Lipschitz-bound step of cnn_6C2F vs naive loop (package default)", r["contender"], value, 3.0, ">=",
            "gloro_fast with its training default n_iter=1 vs the naive 10-iteration loop", info=True)

    # 3. GloRo training step ≤ 1.10× the plain step
    train = _find(rows, op="training_step")
    for r in _gloro_rows(train) or [None]:
        value = (1.0 / r["speedup_vs_plain"]) if r and r["speedup_vs_plain"] else None
        add("GloRo training step ≤ 1.10× plain step (time ratio)", r["contender"] if r else "gloro_fast",
            value, 1.10, "<=", train[0]["case"] if train else "")

    # 4. certify throughput ≥ 0.97× plain inference
    cert = _find(rows, op="certify")
    for r in _gloro_rows(cert) or [None]:
        add("certify throughput ≥ 0.97× plain inference", r["contender"] if r else "gloro_fast",
            r and r["speedup_vs_plain"], 0.97, ">=", cert[0]["case"] if cert else "")

    # 5. the frozen model (gloro_fast.export) ≥ 0.99× the plain network's throughput: the
    # median of paired, interleaved rounds (the unpaired medians are listed for information)
    for r in _find(rows, op="export_paired"):
        p = r.get("paired") or {}
        add("frozen model throughput ≥ 0.99× plain network (paired)", r["contender"], p.get("ratio_median"), 0.99,
            ">=", f"{r['case']}: median of {p.get('pairs')} per-pair ratios, quartiles "
                  f"{p.get('q1', 0):.3f}–{p.get('q3', 0):.3f}", info=r["contender"] != "paired[sound]")
    for r in _find(rows, op="export_paired_cl"):
        p = r.get("paired") or {}
        add("frozen model throughput ≥ 0.99× plain network in channels_last (paired)", r["contender"],
            p.get("ratio_median"), 0.99, ">=", f"{r['case']}: median of {p.get('pairs')} per-pair ratios, quartiles "
                                               f"{p.get('q1', 0):.3f}–{p.get('q3', 0):.3f}",
            info=r["contender"] != "paired[sound]")
    for r in _find(rows, op="export"):
        if r["contender"].startswith(("frozen", "pt2", "onnxruntime")):
            add("frozen model throughput vs plain network (unpaired medians)", r["contender"],
                r["speedup_vs_plain"], 0.99, ">=", r["case"], info=True)

    # 5b. paired targets of issue 11: layers ≤ 1.02× torch.nn, certify ≥ 0.97× the plain
    # forward's throughput, a training step ≤ 1.05× the plain step's time
    def paired_detail(r, p):
        return (f"{r['case']}: median of {p.get('pairs')} per-pair ratios, quartiles "
                f"{p.get('q1', 0):.3f}–{p.get('q3', 0):.3f}")

    for r in _find(rows, op="layer_paired"):
        p = r.get("paired") or {}
        value = 1.0 / p["ratio_median"] if p.get("ratio_median") else None
        add("gloro_fast.nn layer ≤ 1.02× its torch.nn equivalent (time ratio, paired)", r["contender"], value, 1.02,
            "<=", paired_detail(r, p))
    # certify against the plain forward (the small batches have no target yet: information)
    for op, label, info in (("certify_paired", "certify throughput ≥ 0.97× the plain forward (paired)", False),
                            ("certify_small_paired",
                             "certify throughput vs the plain forward, small batches (paired)", True),
                            ("certify_paired_cl",
                             "certify throughput ≥ 0.97× the plain forward in channels_last (paired)", False)):
        for r in _find(rows, op=op):
            p = r.get("paired") or {}
            add(label, r["contender"], p.get("ratio_median"), 0.97, ">=", paired_detail(r, p), info=info)
    for r in _find(rows, op="training_paired"):
        p = r.get("paired") or {}
        value = 1.0 / p["ratio_median"] if p.get("ratio_median") else None
        add("training step ≤ 1.05× the plain step (time ratio, paired)", r["contender"], value, 1.05, "<=",
            paired_detail(r, p))
    # ops against the form they replace (speed-ups, for information)
    for op, label in (("minmax_norm_paired", "fused minmax_norm vs MinMax + norms"),
                      ("same_bits_paired", "same_bits vs torch.equal loop"),
                      ("norm_basis_paired", "norm_basis vs its reference"),
                      ("sound_decision_paired", "sound_decision vs its reference"),
                      ("blocked_linear_reference", "blocked_linear vs its reference"),
                      ("blocked_linear_linear", "blocked_linear vs F.linear, the unblocked floor")):
        for r in _find(rows, op=op):
            p = r.get("paired") or {}
            add(f"{label} (speed-up, paired)", r["contender"], p.get("ratio_median"), 1.0, ">=",
                paired_detail(r, p), info=True)
    for r in _find(rows, op="guard_share"):
        p = r.get("paired") or {}
        share = 100.0 * p["ratio_median"] if p.get("ratio_median") else None
        add("stale-bound guard ≤ 1 % of certify (paired)", r["contender"], share, 1.0, "<=",
            paired_detail(r, p), unit=" %", info=r["params"].get("B") != 256)

    # 6. per-call dispatch overhead (the op minus its kernel) ≤ 10 µs
    for case in sorted({r["case"] for r in rows if r["op"] == "dispatch"}):
        by = {r["contender"]: r for r in rows if r["case"] == case}
        if "kernel" in by and "op" in by:
            value = (by["op"]["median_s"] - by["kernel"]["median_s"]) * 1e6
            add(f"dispatch overhead ≤ 10 µs ({by['op']['params'].get('op')})", "gloro_fast[cpp]", value, 10.0,
                "<=", f"op {fmt_time(by['op']['median_s'])} − kernel {fmt_time(by['kernel']['median_s'])}", unit=" µs")
    return targets


# -- formatting -----------------------------------------------------------------------------
def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value < 100 else f"{value:.0f}×"


def fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{int(value)} B"


def contender_order(name: str) -> tuple:
    order = {"plain": 0, "naive": 1, "eager": 2, "compile": 3}
    return (order.get(name, 4), name)


def markdown(rows, meta, targets, skips, plots, quick) -> str:
    device = meta.get("device", "unknown")
    lines = [f"# gloro_fast benchmark results — `{device}`", ""]
    lines.append("Generated by `make bench-quick` (reduced grid, few rounds)." if quick
                 else "Generated by `make bench` (benchmarks/, pytest-benchmark + report.py).")
    lines.append("All contenders of a case ran in the same session on this device, back to back; times are "
                 "medians of pytest-benchmark rounds; compile time is excluded (warm-up). Speed-up = "
                 "median of the reference contender / median of the row (> 1: faster). An absolute time "
                 "means something only on the device named here.")
    lines.append("")
    lines.append(f"- device: `{device}`; torch {meta.get('torch', '?')}, {meta.get('threads', '?')} threads "
                 f"(OMP_WAIT_POLICY={meta.get('omp_wait_policy', '?')}), float32; date {meta.get('date', '?')}")
    if meta.get("loadavg_start") is not None:
        ls, le = meta["loadavg_start"], meta.get("loadavg_end") or [float("nan")] * 3
        lines.append(f"- machine load average (1 min) at start / end of the run: {ls[0]:.2f} / {le[0]:.2f} "
                     f"(a value above the core count means other processes shared the CPU and timings are noisier)")
    backends = meta.get("backends", {})
    for backend, status in backends.items():
        values = set(status.values())
        if len(values) == 1:
            desc = f"every op → {values.pop()}"
        else:
            desc = ", ".join(f"{op} → {res}" for op, res in status.items())
        lines.append(f"- backend `{backend}`: {desc}")
    if not meta.get("extension_loaded", True):
        lines.append("- the compiled extension gloro_fast._C was not loaded: `cpp` resolves to reference and is "
                     "skipped")
    cap = meta.get("naive_cap_bytes")
    if cap:
        lines.append(f"- naive B×C×d / C×C×d forms are capped at {cap / 2**30:.0f} GiB: above it they run in "
                     "sample (row) chunks under the cap, noted per row; far above it they are skipped (listed below)")
    lines.append("- peak memory: bytes allocated above the live set during one call — CPU: torch allocator "
                 "events replayed from torch.profiler(profile_memory=True); GPU: max_memory_allocated")
    for run in meta.get("partial_runs", []):
        load = run.get("loadavg_start")
        lines.append(f"- re-measured on {run.get('date', '?')}"
                     + (f" (load average {load[0]:.2f} at start)" if load else "")
                     + f": {', '.join(run['cases'])}")
    lines.append("")

    lines += ["## Targets", "", "| target | contender | measured | threshold | verdict | detail |",
              "|---|---|---|---|---|---|"]
    for t in targets:
        unit = t.get("unit", "×")
        value = "—" if t["value"] is None else f"{t['value']:.2f}{unit}"
        verdict = {"met": "**met**", "missed": "**missed**"}.get(t["verdict"], t["verdict"])
        lines.append(f"| {t['target']} | {t['contender']} | {value} | {t['kind']} {t['threshold']:.2f}{unit} | "
                     f"{verdict} | {t['detail']} |")
    if not targets:
        lines.append("| (no target cases in this run) | | | | | |")
    lines.append("")

    by_op: Dict[str, Dict[str, List[dict]]] = OrderedDict()
    for op in list(OP_TITLES) + sorted({r["op"] for r in rows} - set(OP_TITLES)):
        cases: Dict[str, List[dict]] = OrderedDict()
        for row in sorted((r for r in rows if r["op"] == op), key=lambda r: (r["mode"], r["size"] or 0, r["case"])):
            cases.setdefault(row["case"], []).append(row)
        if cases:
            by_op[op] = cases
    skips_by_case = defaultdict(list)
    for skip in skips:
        if "case" in skip:
            skips_by_case[skip["case"]].append(skip)

    for op, cases in by_op.items():
        lines += [f"## {OP_TITLES.get(op, op)}", ""]
        if op in MODE_NOTES:
            lines += [MODE_NOTES[op], ""]
        if op in plots:
            lines += [f"![{op}]({plots[op]})", ""]
        lines += ["| case | contender | median | vs naive | vs eager | vs compile | vs plain | peak mem | rounds "
                  "| note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case, case_rows in cases.items():
            for row in sorted(case_rows, key=lambda r: contender_order(r["contender"])):
                lines.append(
                    f"| {case} | {row['contender']} | {fmt_time(row['median_s'])} | "
                    f"{fmt_ratio(row['speedup_vs_naive'])} | {fmt_ratio(row['speedup_vs_eager'])} | "
                    f"{fmt_ratio(row['speedup_vs_compile'])} | {fmt_ratio(row['speedup_vs_plain'])} | "
                    f"{fmt_bytes(row['peak_bytes'])} | {row['rounds']} | {row['note'] or ''} |")
            for skip in skips_by_case.get(case, []):
                lines.append(f"| {case} | {skip['contender']} | skipped | | | | | | | {skip['reason']} |")
        lines.append("")

    generic: Dict[tuple, set] = OrderedDict()
    for skip in skips:
        if "case" not in skip:
            generic.setdefault((skip["contender"], skip["reason"]), set()).update(skip.get("ops", []))
    if generic:
        lines += ["## Contenders not run", ""]
        for (contender, reason), ops in generic.items():
            lines.append(f"- {contender} ({', '.join(sorted(ops))}): {reason}")
        lines.append("")
    lines += ["## How to run", "",
              "```", "make bench         # full suite, ~15 min on 2 cores: results/<device>.json, RESULTS.md, plots",
              "make bench-quick   # reduced grid (< 3 min) into benchmarks/results/quick/", "```", ""]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------
PLOT_OPS = ("margin_path", "class_distances", "power_iteration_linear", "power_iteration_conv")


def plot(rows, device, out_dir, rel_to) -> Dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover
        print(f"report: matplotlib unavailable ({exc}); no plots")
        return {}
    written = {}
    for op in PLOT_OPS:
        op_rows = [r for r in rows if r["op"] == op and r["size"]]
        if not op_rows:
            continue
        iters = {r["params"].get("n_iter") for r in op_rows}
        if 10 in iters:  # one iteration count per plot: the naive's 10
            op_rows = [r for r in op_rows if r["params"].get("n_iter") == 10]
        modes = sorted({r["mode"] for r in op_rows})
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.8 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            for j, base in enumerate(("naive", "compile")):
                ax = axes[i][j]
                series = defaultdict(list)
                for r in op_rows:
                    if r["mode"] == mode and r["contender"] != base and r[f"speedup_vs_{base}"]:
                        series[r["contender"]].append((r["size"], r[f"speedup_vs_{base}"]))
                for name in sorted(series, key=contender_order):
                    pts = sorted(series[name])
                    # several cases can share a size (e.g. B·C·d): keep them all as points
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("problem size" + (" (B·C·d)" if op == "margin_path" else
                                                 " (C·C·d)" if op == "class_distances" else
                                                 " (weight elements)" if op == "power_iteration_linear"
                                                 else " (kernel elements × output pixels)"))
                ax.set_ylabel(f"speed-up vs {base}")
                ax.set_title(f"{op} {mode}" + (" (n_iter=10)" if op.startswith("power") else ""))
                ax.grid(True, which="both", alpha=0.3)
                if series:
                    ax.legend(fontsize=8)
        fig.suptitle(f"{op} — {device}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{device}-{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written[op] = os.path.relpath(path, rel_to)
    return written


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, nargs="+",
                        help="pytest-benchmark JSON (--benchmark-json); several runs of one device are merged")
    parser.add_argument("--meta", default=None, help="run metadata (default: <raw without .json>.meta.json)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where RESULTS.md goes; results/ below it (default: benchmarks/)")
    parser.add_argument("--md", default="RESULTS.md", help="name of the markdown report in --out")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--previous", default=None,
                        help="an earlier results/<device>.json: its cases that --raw did not measure are kept "
                             "(a partial re-run updates the report instead of replacing it)")
    args = parser.parse_args(argv)
    rows, meta = [], {}
    for raw in args.raw:
        meta_path = args.meta or (raw[:-5] if raw.endswith(".json") else raw) + ".meta.json"
        more_rows, more_meta = load(raw, meta_path)
        rows += more_rows
        if not meta:
            meta = more_meta
        else:  # one device, several runs (e.g. one per make target): their skips together
            meta["skips"] = meta.get("skips", []) + more_meta.get("skips", [])
    if not rows:
        print(f"report: no benchmark records in {' '.join(args.raw)}")
        return 1
    if args.previous:
        with open(args.previous, encoding="utf-8") as fh:
            previous = json.load(fh)
        measured = {r["case"] for r in rows}
        kept = [r for r in previous["rows"] if r["case"] not in measured]
        meta, new_meta = previous["meta"], meta
        meta["skips"] = previous.get("skipped", []) + new_meta.get("skips", [])
        meta["partial_runs"] = meta.get("partial_runs", []) + [
            {"date": new_meta.get("date"), "cases": sorted(measured), "loadavg_start": new_meta.get("loadavg_start")}]
        rows = kept + rows
    add_ratios(rows)
    targets = compute_targets(rows)
    device = meta.get("device", "unknown")
    quick = bool(meta.get("quick"))
    results_dir = os.path.join(args.out, "results")
    os.makedirs(results_dir, exist_ok=True)
    plots = {} if args.no_plots else plot(rows, device, results_dir, args.out)
    skips = meta.get("skips", [])
    with open(os.path.join(results_dir, f"{device}.json"), "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "targets": targets, "rows": rows, "skipped": skips}, fh, indent=1,
                  default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    with open(os.path.join(args.out, args.md), "w", encoding="utf-8") as fh:
        fh.write(markdown(rows, meta, targets, skips, plots, quick))
    print(f"report: {len(rows)} records → {os.path.join(results_dir, device + '.json')}, "
          f"{os.path.join(args.out, args.md)}, {len(plots)} plots")
    for t in targets:
        value = "—" if t["value"] is None else f"{t['value']:.2f}{t.get('unit', '×')}"
        print(f"  [{t['verdict']:>12}] {t['target']} — {t['contender']}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
