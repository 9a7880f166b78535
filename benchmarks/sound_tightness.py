"""Tightness of the sound upper bounds on the paper architectures at their real input sizes:
upper / exact for every dense and convolution layer (and LiResNet block).

"exact" is the largest eigenvalue of the explicit Gram matrix (float64, LAPACK) where the
operator's smaller side has at most ``--exact-max`` coordinates; otherwise a long power
iteration in float64 gives a lower bound ‖Au‖ ≤ ‖A‖, so upper / lower over-states the gap
(marked "≤"). Models: each architecture with seeded orthogonal initialisation, plus any
``--checkpoint`` (a trained run's model.pt). Writes ``benchmarks/results/sound_tightness.md``
and ``.json``.

    python benchmarks/sound_tightness.py [--checkpoint runs/gloro/model.pt] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

from gloro_fast import models
from gloro_fast.nn import Conv2d, Linear, PowerIterationModule
from gloro_fast.ops.power_iteration_conv import conv_operator, conv_operator_adjoint

ARCHS = {"2C2F": (1, 28, 28), "4C3F": (1, 28, 28), "6C2F": (3, 32, 32), "8C2F": (3, 64, 64),
         "liresnet": (3, 32, 32)}
HERE = os.path.dirname(os.path.abspath(__file__))


def conv_args(m):
    return (tuple(m.stride), m.pads_for(m.input_shape[1:]), tuple(m.dilation), m.groups)


def exact_conv(m, limit):
    shape = m.input_shape
    n = math.prod(shape)
    w = m.weight.detach().double()
    args = conv_args(m)
    out_numel = math.prod(conv_operator(torch.zeros((1,) + shape, dtype=torch.float64), w, *args,
                                        residual=m.residual).shape)
    if min(n, out_numel) > limit:
        return None
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    cols = [conv_operator(chunk, w, *args, residual=m.residual).reshape(chunk.shape[0], -1)
            for chunk in basis.split(1024)]
    a = torch.cat(cols)  # (n_in, n_out) = Aᵀ
    gram = a.t() @ a if a.shape[1] < a.shape[0] else a @ a.t()
    return float(torch.linalg.eigvalsh(gram)[-1]) ** 0.5


def power_lower(m, iters, tol=1e-10):
    w = m.weight.detach().double()
    args = conv_args(m)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn((1,) + m.input_shape, generator=gen, dtype=torch.float64)
    sigma = 0.0
    for _ in range(iters):
        u = u / u.norm()
        v = conv_operator(u, w, *args, residual=m.residual)
        new = float(v.norm())
        u = conv_operator_adjoint(v, w, *args, m.input_shape[1:], residual=m.residual)
        if abs(new - sigma) <= tol * new:
            sigma = new
            break
        sigma = new
    return sigma


def rows(model, label, limit, iters):
    out = []
    for name, m in model.body.named_modules(prefix="body"):
        if not isinstance(m, PowerIterationModule):
            continue
        t0 = time.perf_counter()
        upper = float(m.lipschitz_upper_bound())
        seconds = time.perf_counter() - t0
        if isinstance(m, Linear):
            exact, kind = float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)), "exact"
        else:
            exact, kind = exact_conv(m, limit), "exact"
            if exact is None:
                exact, kind = power_lower(m, iters), "lower"
        out.append(dict(model=label, layer=name, type=type(m).__name__, shape=str(tuple(m.weight.shape)),
                        input=str(m.input_shape if isinstance(m, Conv2d) else (m.in_features,)),
                        upper=upper, reference=exact, reference_kind=kind, ratio=upper / exact,
                        seconds=seconds))
        print(f"{label:22s} {name:8s} {type(m).__name__:10s} upper/{kind} = {upper / exact:.6f} "
              f"({seconds:.2f} s)", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="a trained model.pt")
    parser.add_argument("--quick", action="store_true", help="2C2F and 6C2F only, shorter power iterations")
    parser.add_argument("--exact-max", type=int, default=7000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "sound_tightness"))
    args = parser.parse_args(argv)
    iters = 300 if args.quick else 2000
    archs = ["2C2F", "6C2F"] if args.quick else list(ARCHS)
    table = []
    for arch in archs:
        torch.manual_seed(0)
        model = models.build(arch, ARCHS[arch], 10 if arch != "8C2F" else 200, 0.3)
        table += rows(model, f"{arch} (init)", args.exact_max, iters)
    for path in args.checkpoint:
        from gloro_fast.train import load_checkpoint

        table += rows(load_checkpoint(path), f"{os.path.basename(os.path.dirname(path)) or path} (trained)",
                      args.exact_max, iters)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": table}, fh, indent=1)
    lines = ["# Tightness of the sound upper bounds", "",
             "upper / exact per layer (`benchmarks/sound_tightness.py`); '≤' where the reference is a "
             "power-iteration lower bound (the true ratio is smaller).", "",
             "| model | layer | type | kernel | input | upper / reference | bound time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        mark = "" if r["reference_kind"] == "exact" else "≤ "
        lines.append(f"| {r['model']} | {r['layer']} | {r['type']} | {r['shape']} | {r['input']} | "
                     f"{mark}{r['ratio']:.6f} | {r['seconds']:.2f} |")
    worst = {t: max((r["ratio"] for r in table if r["type"] == t), default=math.nan)
             for t in ("Linear", "Conv2d", "LiResBlock")}
    lines += ["", "Worst ratio per layer type: " + ", ".join(f"{t} {v:.6f}" for t, v in worst.items()), ""]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
