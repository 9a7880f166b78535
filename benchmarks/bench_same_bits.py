"""same_bits: the stale-bound guard's comparison of every parameter with the copy its bounds
came from, against the ``torch.equal`` loop it replaces (paired interleaved rounds, > 1: the
op is faster), on the parameters of 6C2F (2.2 M) and 2C2F; and the whole guard's share of a
``certify`` call (6C2F, B = 256: the target is ≤ 1 %), measured as paired rounds of the guard
(``cached_bounds(model, "sound", hot=True)``: the key, then same_bits) against certify.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, pick, record_skip, run_paired
from gloro_fast.bound_cache import cached_bounds
from gloro_fast.models import cnn_2C2F, cnn_6C2F
from gloro_fast.ops import resolve_backend, same_bits

MODELS = {"6C2F": (cnn_6C2F, (3, 32, 32)), "2C2F": (cnn_2C2F, (1, 28, 28))}
PAIRS = pick(25, 7)


def build(arch):
    make, shape = MODELS[arch]
    torch.manual_seed(0)
    return make(input_shape=shape, num_classes=10).to(DEVICE, DTYPE).eval(), shape


@pytest.mark.parametrize("arch", list(MODELS))
def test_same_bits_paired(benchmark, arch):
    case = f"same_bits vs torch.equal, paired, {arch} parameters"
    if resolve_backend(DEVICE, "same_bits") == "reference":
        record_skip(case, "gloro_fast", "no compiled same_bits kernel for this device")
    model, _ = build(arch)
    params = [p.detach() for p in model.parameters()]
    snapshot = [p.clone() for p in params]

    def ours():
        return same_bits(snapshot, params)

    def theirs():
        return all(torch.equal(a, b) for a, b in zip(snapshot, params))

    run_paired(benchmark, ours, theirs, case=case, contender="gloro_fast [cpp]",
               params={"model": arch, "numel": sum(p.numel() for p in params)},
               size=sum(p.numel() for p in params), pairs=PAIRS, extra={"op": "same_bits_paired", "mode": "fwd"})


GUARD_CASES = pick((("6C2F", 256), ("2C2F", 256), ("2C2F", 1024)), (("2C2F", 256),))


@pytest.mark.parametrize("arch,batch", GUARD_CASES)
def test_guard_share(benchmark, arch, batch):
    """Per pair: the guard's time over certify's (the recorded 'ratio' is that share)."""
    model, shape = build(arch)
    x = torch.rand((batch,) + shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    model.sound_bounds()

    def certify():
        return model.certify(x)

    def guard():
        return cached_bounds(model, "sound", hot=True)

    run_paired(benchmark, certify, guard, case=f"stale-bound guard / certify, paired, {arch} B={batch}",
               contender="gloro_fast guard share", params={"model": arch, "B": batch}, size=batch,
               pairs=PAIRS, extra={"op": "guard_share", "mode": "fwd"})
