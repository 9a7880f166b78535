"""minmax_norm: MinMax and each sample's sum of squares in one pass, against what the
certifying pass would otherwise run — MinMax written into one output (torch.minimum and
torch.maximum with out=, as gloro_fast.nn.MinMax and the frozen model) followed by the
activation norms measured on its output (:func:`gloro_fast.sound.forward_error.activation_norm_upper`)
— eager and compiled, as paired interleaved rounds (median ratio of their times, > 1: the
fused kernel is faster). Shapes: the MinMax inputs of 6C2F at B = 256 and of 2C2F at B = 1024.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, compiled, pick, record_skip, run_paired
from gloro_fast.nn.activations import minmax
from gloro_fast.ops import minmax_norm, resolve_backend
from gloro_fast.sound.forward_error import activation_norm_upper

SHAPES = pick(((256, 32, 32, 32), (256, 64, 16, 16), (1024, 16, 14, 14), (1024, 32, 7, 7)),
              ((256, 64, 16, 16),))
PAIRS = pick(15, 5)


def unfused(x):
    out = minmax(x)
    return out, activation_norm_upper(out)


@pytest.mark.parametrize("compile_", (False, True), ids=("eager", "compile"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_minmax_norm_paired(benchmark, shape, compile_):
    where = "compile" if compile_ else "eager"
    case = f"minmax_norm vs minmax + norm, paired, {tuple(shape)} {where}"
    if resolve_backend(DEVICE, "minmax_norm") == "reference":
        record_skip(case, "gloro_fast", "no compiled minmax_norm kernel for this device")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    theirs = compiled(("minmax_norm_unfused", tuple(shape)), unfused) if compile_ else unfused

    def ours():
        with torch.no_grad():
            return minmax_norm(x)

    def plain():
        with torch.no_grad():
            return theirs(x)

    run_paired(benchmark, ours, plain, case=case, contender=f"gloro_fast [{where}]",
               params={"shape": list(shape), "compiled": compile_}, size=x.numel(), pairs=PAIRS,
               extra={"op": "minmax_norm_paired", "mode": "fwd"})
