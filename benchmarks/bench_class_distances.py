"""``class_distances(W)`` alone: D (C×C), D_ji = ‖w_j − w_i‖; forward (no autograd) and
forward+backward (loss ⟨D, G⟩ for a fixed random G).

Contenders: naive (a materialised C×C×d difference tensor, chunked by rows under
``BENCH_NAIVE_CAP_GB``), eager (Gram form, one GEMM), compile (of eager), gloro_fast
backends. The full margin path (with ``bottom_logit``) is in bench_bottom_logit.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.harness import (
    DEVICE,
    DTYPE,
    NAIVE_CAP_BYTES,
    NAIVE_MAX_ELEMENTS,
    compiled,
    contenders,
    label,
    pick,
    record_skip,
    run_contender,
    zero_grads,
)
from gloro_fast.ops import class_distances

NAIVE_TENSORS = {"fwd": 2, "fwd+bwd": 3}
SHAPES = pick([(c, d) for c in (10, 100, 1000) for d in (512, 2048)], [(100, 512)])
MODES = ("fwd", "fwd+bwd")


def distances_eager(W):
    sq = (W * W).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (W @ W.t())
    eye = torch.eye(W.shape[0], dtype=torch.bool, device=W.device)
    return torch.where(eye, 0.0, d2.clamp_min(1e-30).sqrt())


def _loss_eager(W, G):
    return (distances_eager(W) * G).sum()


def _loss_gloro_fast(W, G):
    return (class_distances(W) * G).sum()


@pytest.mark.parametrize("contender", contenders())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C,d", SHAPES)
def test_class_distances(benchmark, C, d, mode, contender):
    W = (torch.randn(C, d, device=DEVICE, dtype=DTYPE) / math.sqrt(d)).requires_grad_(mode == "fwd+bwd")
    G = torch.randn(C, C, device=DEVICE, dtype=DTYPE)
    grad = mode == "fwd+bwd"
    note = ""
    case = f"class_distances {mode} C={C} d={d}"
    if contender == "naive" and C * C * d > NAIVE_MAX_ELEMENTS:
        record_skip(case, "naive", f"C·C·d = {C * C * d:.2g} elements: the literal form needs "
                    f"~{NAIVE_TENSORS[mode] * C * C * d * 4 / 2**30:.0f} GiB and a chunked run would take "
                    f"minutes (cap {NAIVE_MAX_ELEMENTS:.2g} elements)")
    if contender == "naive":
        per_row = NAIVE_TENSORS[mode] * C * d * 4
        rows = max(1, min(C, int(NAIVE_CAP_BYTES // per_row)))
        if rows < C:
            note = (f"chunked: {math.ceil(C / rows)} row chunks of ≤{rows} (literal form needs "
                    f"~{per_row * C / 2**30:.1f} GiB > cap {NAIVE_CAP_BYTES / 2**30:.0f} GiB)")

        def loss_fn(W, G):
            total = 0.0
            for s in range(0, C, rows):
                diff = W[s:s + rows, None, :] - W[None, :, :]
                part = (torch.sqrt((diff * diff).sum(dim=-1) + 1e-30) * G[s:s + rows]).sum()
                del diff
                if grad and rows < C:
                    part.backward()
                    part = part.detach()
                total = total + part
            return total
        chunk_backward = grad and rows < C
    else:
        chunk_backward = False
        if contender == "eager":
            loss_fn = _loss_eager
        elif contender == "compile":
            loss_fn = compiled(("class_distances", mode), _loss_eager)
        else:
            loss_fn = _loss_gloro_fast

    if grad:
        def step():
            zero_grads((W,))
            loss = loss_fn(W, G)
            if not chunk_backward:
                loss.backward()
            return loss
    else:
        def step():
            with torch.no_grad():
                return loss_fn(W, G)

    kw = dict(case=case, contender=label(contender),
              params={"C": C, "d": d}, size=C * C * d, note=note,
              extra={"op": "class_distances", "mode": mode})
    run_contender(benchmark, step, contender, ("class_distances",), **kw)
