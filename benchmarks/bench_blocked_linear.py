"""blocked_linear: the certifying pass's dense layer (each dot product summed in 16 blocks),
paired interleaved rounds (> 1: ours is faster), on the dense layers of the paper models at
their certify batch sizes (2C2F's 1568 → 100 at B = 1024, 6C2F's 4096 → 512 at B = 256):

- the op on its backend (the C++ CPU kernel: one batched product, then the blocks' tree and
  the bias in one pass, into the product's first block) against its reference in torch
  ops (the batched product, ``tree_sum``'s additions, the bias: what the frozen model runs),
- and against ``torch.nn.functional.linear``, the unblocked layer of the plain network (the
  floor: the same flops, without the (k, N, out) partial products).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, pick, record_skip, run_paired
from gloro_fast.nn.linear import certifying_blocks
from gloro_fast.ops import blocked_linear, blocked_linear_reference, resolve_backend

CASES = pick((("2C2F", 1568, 100, 1024), ("6C2F", 4096, 512, 256)), (("2C2F", 1568, 100, 256),))
PAIRS = pick(25, 7)


def _operands(n, out, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(out, n, generator=g) / n ** 0.5).to(DEVICE, DTYPE)
    bias = torch.randn(out, generator=g).to(DEVICE, DTYPE)
    return x, w, bias


@pytest.mark.parametrize("against", ("reference", "linear"))
@pytest.mark.parametrize("arch,n,out,batch", CASES)
def test_blocked_linear_paired(benchmark, arch, n, out, batch, against):
    backend = resolve_backend(DEVICE, "blocked_linear")
    other = "its reference" if against == "reference" else "F.linear"
    case = f"blocked_linear vs {other}, paired, {arch} dense {n}->{out} B={batch}"
    if against == "reference" and backend == "reference":
        record_skip(case, "gloro_fast", "no compiled blocked_linear kernel for this device")
    x, w, bias = _operands(n, out, batch)
    k, _ = certifying_blocks(n)

    def ours():
        return blocked_linear(x, w, bias, k)

    if against == "reference":
        def theirs():
            return blocked_linear_reference(x, w, bias, k)

        assert torch.equal(ours(), theirs())  # the kernel gives the reference's bits
    else:
        def theirs():
            return torch.nn.functional.linear(x, w, bias)

    with torch.no_grad():
        run_paired(benchmark, ours, theirs, case=case, contender=f"gloro_fast [{backend}]",
                   params={"model": arch, "n": n, "out": out, "B": batch, "against": against}, size=batch,
                   pairs=PAIRS, extra={"op": f"blocked_linear_{against}", "mode": "fwd"})
