"""norm_basis: the allowance's basis from the certifying pass's recorded norms in one op (the
C++ CPU kernel) against its reference, ``norm_uppers`` then the stack in torch ops (what
``certify`` ran before), paired interleaved rounds (> 1: the op is faster), on the norms the
paper models record at their certify batch sizes (2C2F B = 1024, 6C2F B = 256).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, pick, record_skip, run_paired
from gloro_fast.models import cnn_2C2F, cnn_6C2F
from gloro_fast.ops import norm_basis, resolve_backend
from gloro_fast.sound.forward_error import SumOfSquares, norm_terms, norm_uppers

# the entries of each sum the models record (after each MinMax; the features last)
MODELS = {"6C2F": (cnn_6C2F, (3, 32, 32), (32768, 32768, 16384, 16384, 4096, 4096, 512)),
          "2C2F": (cnn_2C2F, (1, 28, 28), (3136, 1568, 100))}
CASES = pick((("2C2F", 1024), ("6C2F", 256)), (("2C2F", 256),))
PAIRS = pick(25, 7)


@pytest.mark.parametrize("arch,batch", CASES)
def test_norm_basis_paired(benchmark, arch, batch):
    case = f"norm_basis vs its reference, paired, {arch} B={batch}"
    if resolve_backend(DEVICE, "norm_basis") == "reference":
        record_skip(case, "gloro_fast", "no compiled norm_basis kernel for this device")
    _, _, terms = MODELS[arch]
    g = torch.Generator().manual_seed(0)
    # the input's norm (a bound already), the MinMax sums of squares, the features' sum
    bounds = [torch.rand(batch, generator=g, dtype=torch.float64).to(DEVICE) * 30]
    bounds += [SumOfSquares(torch.rand(batch, generator=g, dtype=torch.float64).to(DEVICE) * 1e3, m) for m in terms]
    args = norm_terms(bounds)

    def ours():
        return norm_basis(*args)

    def theirs():
        return torch.stack(norm_uppers(bounds) + [torch.ones_like(args[0][0])], dim=1)

    # a correctly rounded square root against torch's faithful one: a few ulps apart
    torch.testing.assert_close(ours(), theirs(), rtol=2.0 ** -49, atol=0.0)
    run_paired(benchmark, ours, theirs, case=case, contender="gloro_fast [cpp]",
               params={"model": arch, "B": batch}, size=batch, pairs=PAIRS,
               extra={"op": "norm_basis_paired", "mode": "fwd"})
