"""The margin path: D = class_distances(W), f_⊥ = bottom_logit(f, D, K, ε), loss =
CE([f, f_⊥], y); forward (no autograd) and forward+backward (into f, W and K).

Contenders:
- naive: the literal public-GloRo form, K_ij = ‖K w_j − K w_i‖ for every (sample, class)
  pair through a materialised B×C×d tensor. Where that form would need more than
  ``BENCH_NAIVE_CAP_GB`` (default 4 GiB) it runs in sample chunks under the cap (same
  per-sample arithmetic; backward per chunk, gradients accumulated) and says so in its
  note. The chunked run skips the page faults of a fresh multi-GB tensor, so speed-ups
  against it are conservative.
- eager: Gram-form distances (one C×C GEMM), one gathered B×C row pass, masked max.
- compile: torch.compile of eager (one specialised graph per shape, compiled in warm-up).
- gloro_fast[...]: the public ops on each available backend.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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
from gloro_fast.ops import bottom_logit, class_distances

EPS = 0.141
# B×C×d tensors alive at the peak of the naive form (measured with the profiler: the
# difference and its square in the forward; the saved difference and two gradient
# products in the backward)
NAIVE_TENSORS = {"fwd": 2, "fwd+bwd": 3}
TARGET_POINT = (512, 1000, 2048)

_FULL = sorted({(b, c, d) for b in (256, 1024) for c in (10, 100, 1000) for d in (512, 2048)}
               | {TARGET_POINT})
_QUICK = [(256, 10, 512), TARGET_POINT]
SHAPES = pick(_FULL, _QUICK)
MODES = ("fwd", "fwd+bwd")


# -- contenders -------------------------------------------------------------------------
def _augmented_ce(f, bottom, y):
    return F.cross_entropy(torch.cat([f, bottom.unsqueeze(1)], dim=1), y)


def margin_naive(f, W, K, y, eps=EPS, reduction_scale=None):
    """Public GloRo code, literally: a B×C×d tensor of weight differences.

    (Public code builds it as B×d×C from TensorFlow's (d, C) kernel; with PyTorch's (C, d)
    weight that layout reduces over a strided axis and its backward is ~3× slower here, so
    the naive contender uses the contiguous B×C×d layout: the faster of the two.)"""
    kW = K * W  # (C, d)
    j = f.argmax(dim=1)
    kW_j = kW.index_select(0, j)  # (B, d)
    kW_ij = kW_j[:, None, :] - kW[None]  # (B, C, d)
    K_ij = torch.sqrt((kW_ij * kW_ij).sum(dim=-1) + 1e-30)  # (B, C); + tiny: finite grad at i = j
    y_bot_i = f + eps * K_ij
    y_bot_i = y_bot_i.masked_fill(F.one_hot(j, f.shape[1]).bool(), float("-inf"))
    y_bot = y_bot_i.max(dim=1).values
    aug = torch.cat([f, y_bot.unsqueeze(1)], dim=1)
    if reduction_scale is None:
        return F.cross_entropy(aug, y)
    return F.cross_entropy(aug, y, reduction="sum") * reduction_scale


def margin_eager(f, W, K, y, eps: float = EPS):
    """Careful eager: Gram-form distances and one gathered row per sample."""
    sq = (W * W).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (W @ W.t())
    eye = torch.eye(W.shape[0], dtype=torch.bool, device=W.device)
    D = torch.where(eye, 0.0, d2.clamp_min(1e-30).sqrt())
    j = f.argmax(dim=1)
    extra = f + (eps * K) * D.index_select(0, j)
    extra = extra.masked_fill(F.one_hot(j, f.shape[1]).bool(), float("-inf"))
    return _augmented_ce(f, extra.amax(dim=1), y)


def margin_gloro_fast(f, W, K, y, eps: float = EPS):
    D = class_distances(W)
    bottom, _ = bottom_logit(f, D, K, eps)
    return _augmented_ce(f, bottom, y)


def naive_chunk(B, C, d, mode) -> int:
    """Samples per chunk keeping the naive form under the cap (B when it fits)."""
    per_sample = NAIVE_TENSORS[mode] * C * d * torch.finfo(DTYPE).bits // 8
    return max(1, min(B, int(NAIVE_CAP_BYTES // per_sample)))


def make_naive(B, C, d, mode):
    chunk = naive_chunk(B, C, d, mode)
    literal_gb = NAIVE_TENSORS[mode] * B * C * d * 4 / 2**30
    if chunk >= B:
        return margin_naive, "", chunk

    note = (f"chunked: {math.ceil(B / chunk)} chunks of ≤{chunk} samples (literal form needs "
            f"~{literal_gb:.1f} GiB > cap {NAIVE_CAP_BYTES / 2**30:.0f} GiB)")

    if mode == "fwd":
        def run(f, W, K, y, eps=EPS):
            bottoms = []
            for s in range(0, B, chunk):
                fs = f[s:s + chunk]
                kW = K * W
                j = fs.argmax(dim=1)
                kW_ij = kW.index_select(0, j)[:, None, :] - kW[None]
                K_ij = torch.sqrt((kW_ij * kW_ij).sum(dim=-1) + 1e-30)
                del kW_ij
                yb = (fs + eps * K_ij).masked_fill(F.one_hot(j, C).bool(), float("-inf"))
                bottoms.append(yb.max(dim=1).values)
            return _augmented_ce(f, torch.cat(bottoms), y)
    else:
        def run(f, W, K, y, eps=EPS):
            total = 0.0
            for s in range(0, B, chunk):
                loss = margin_naive(f[s:s + chunk], W, K, y[s:s + chunk], eps, reduction_scale=1.0 / B)
                loss.backward()
                total = total + loss.detach()
            return total
    return run, note, chunk


# -- the benchmark ----------------------------------------------------------------------
def _inputs(B, C, d):
    f = torch.randn(B, C, device=DEVICE, dtype=DTYPE)
    W = torch.randn(C, d, device=DEVICE, dtype=DTYPE) / math.sqrt(d)
    K = torch.tensor(1.3, device=DEVICE, dtype=DTYPE)
    y = torch.randint(0, C, (B,), device=DEVICE)
    return f, W, K, y


@pytest.mark.parametrize("contender", contenders())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,C,d", SHAPES)
def test_margin_path(benchmark, B, C, d, mode, contender):
    f, W, K, y = _inputs(B, C, d)
    grad = mode == "fwd+bwd"
    for t in (f, W, K):
        t.requires_grad_(grad)
    note = ""
    chunk_backward = False
    case = f"margin path {mode} B={B} C={C} d={d}"
    if contender == "naive" and B * C * d > NAIVE_MAX_ELEMENTS:
        record_skip(case, "naive", f"B·C·d = {B * C * d:.2g} elements: the literal form needs "
                    f"~{NAIVE_TENSORS[mode] * B * C * d * 4 / 2**30:.0f} GiB and a chunked run would take "
                    f"minutes (cap {NAIVE_MAX_ELEMENTS:.2g} elements)")
    if contender == "naive":
        fn, note, chunk = make_naive(B, C, d, mode)
        chunk_backward = grad and chunk < B
    elif contender == "eager":
        fn = margin_eager
    elif contender == "compile":
        if (B, C, d) == TARGET_POINT:  # the target's compile contender: a static, shape-specialised graph
            fn = compiled(("margin", mode, B, C, d), margin_eager, dynamic=False)
        else:  # torch.compile defaults: after one recompile, one dynamic-shape graph for the grid
            fn = compiled(("margin", mode), margin_eager)
    else:
        fn = margin_gloro_fast

    if grad:
        def step():
            zero_grads((f, W, K))
            loss = fn(f, W, K, y)
            if not chunk_backward:
                loss.backward()
            return loss
    else:
        def step():
            with torch.no_grad():
                return fn(f, W, K, y)

    params = {"B": B, "C": C, "d": d}
    kw = dict(case=case, contender=label(contender), params=params, size=B * C * d, note=note,
              extra={"op": "margin_path", "mode": mode})
    run_contender(benchmark, step, contender, ("class_distances", "bottom_logit"), **kw)
