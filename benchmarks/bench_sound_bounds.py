"""Sound bounds of the paper architectures: ``GloroNet.sound_bounds()`` from an empty
cache — every layer's provable upper bound (float64, on the CPU), the class distances and
the rounding-allowance constants — at the models' real input sizes, float32 weights
(seeded orthogonal initialisation).

Contenders:
- ``gloro_fast[sound]``: ``model.sound_bounds()`` (the README's target: all sound bounds of
  cnn_6C2F in < 2 s on the 2-core CPU);
- ``estimate``: ``model.estimate_bounds()``, the converged power iteration the GloRo paper
  certifies with (tol 1e-6; from the model's fresh iterates; not a proof);
- ``naive``: exact norms from the explicit operator matrices and
  ``torch.linalg.matrix_norm(ord=2)`` in float64 — the exact answer a user could compute
  (not a proof either: LAPACK's SVD has no guaranteed direction of error), only where the
  matrices fit (2C2F).
Computed once per weights and cached by GloroNet, so this cost is paid once per
evaluation, never per certified batch.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import pick, record_skip, run_case
from gloro_fast import models
from gloro_fast.nn import Conv2d, Linear

ARCHS = pick({"2C2F": (1, 28, 28), "6C2F": (3, 32, 32), "liresnet": (3, 32, 32), "4C3F": (1, 28, 28)},
             {"2C2F": (1, 28, 28), "6C2F": (3, 32, 32)})
EXPLICIT_MAX = 4000  # the naive contender: explicit matrices of at most this many columns


def build(arch):
    torch.manual_seed(0)
    return models.build(arch, ARCHS[arch], 10, 0.141)


def explicit_norms(model):
    norms = []
    for m in model.body.modules():
        if isinstance(m, Linear):
            norms.append(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
        elif isinstance(m, Conv2d):
            shape = m.input_shape
            n = math.prod(shape)
            w = m.weight.detach().double()
            top, bottom, left, right = m.pads_for(shape[1:])
            basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
            out = F.conv2d(F.pad(basis, (left, right, top, bottom)), w, None, m.stride, 0, m.dilation, m.groups)
            if m.residual:
                out = out + basis
            norms.append(torch.linalg.matrix_norm(out.reshape(n, -1), ord=2))
    return math.prod(float(v) for v in norms)


def fits_explicit(model):
    return all(math.prod(m.input_shape) <= EXPLICIT_MAX for m in model.body.modules() if isinstance(m, Conv2d))


@pytest.mark.parametrize("contender", ["gloro_fast[sound]", "estimate", "naive"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sound_bounds(benchmark, arch, contender):
    model = build(arch).eval()
    case = f"sound bounds {arch}"
    if contender == "naive" and not fits_explicit(model):
        record_skip(case, contender, f"explicit operator matrices of {arch} exceed {EXPLICIT_MAX} columns")
    start = [b.clone() for b in model.buffers()]

    def reset():
        with torch.no_grad():
            for b, s in zip(model.buffers(), start):
                b.copy_(s)
        model.clear_bound_cache()

    if contender == "gloro_fast[sound]":
        def fn():
            return model.sound_bounds().lipschitz
    elif contender == "estimate":
        def fn():
            return float(model.estimate_bounds().lipschitz)
    else:
        def fn():
            return explicit_norms(model)

    reset()
    sound = model.sound_bounds().lipschitz
    reset()
    estimate = float(model.estimate_bounds().lipschitz)
    reset()
    extra = {"op": "sound_bounds", "mode": "eval", "K_sound": sound, "K_estimate": estimate}
    run_case(benchmark, fn, case=case, contender=contender, params={"model": arch},
             size=sum(p.numel() for p in model.parameters()), setup=reset, extra=extra,
             min_rounds=3)
