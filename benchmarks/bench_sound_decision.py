"""sound_decision: the sound test of ``certify`` in one op (the C++ CPU kernel) against its
reference, ``LinearForms.evaluate`` then ``decide`` in torch ops (what the frozen model
runs), paired interleaved rounds (> 1: the op is faster), on the forms and activations of
the paper models at their certify batch sizes (2C2F B = 1024, 6C2F B = 256) and at C = 100.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, pick, record_skip, run_paired
from gloro_fast.models import cnn_2C2F, cnn_6C2F
from gloro_fast.ops import resolve_backend, sound_decision
from gloro_fast.sound.decision import decide

MODELS = {"6C2F": (cnn_6C2F, (3, 32, 32)), "2C2F": (cnn_2C2F, (1, 28, 28))}
CASES = pick((("2C2F", 1024, 10), ("6C2F", 256, 10), ("2C2F", 1024, 100)), (("2C2F", 256, 10),))
PAIRS = pick(25, 7)


@pytest.mark.parametrize("arch,batch,classes", CASES)
def test_sound_decision_paired(benchmark, arch, batch, classes):
    case = f"sound_decision vs its reference, paired, {arch} B={batch} C={classes}"
    if resolve_backend(DEVICE, "sound_decision") == "reference":
        record_skip(case, "gloro_fast", "no compiled sound_decision kernel for this device")
    make, shape = MODELS[arch]
    torch.manual_seed(0)
    model = make(input_shape=shape, num_classes=classes).to(DEVICE, DTYPE).eval()
    x = torch.rand((batch,) + shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    with torch.no_grad():
        logits, sb, forms, basis, _ = model._sound_basis(x)
    eps = model.epsilon

    def ours():
        return sound_decision(logits, sb.distances, basis, forms, eps)

    def theirs():
        return decide(logits, sb.distances, forms.evaluate(basis), eps)

    run_paired(benchmark, ours, theirs, case=case, contender="gloro_fast [cpp]",
               params={"model": arch, "B": batch, "C": classes}, size=batch, pairs=PAIRS,
               extra={"op": "sound_decision_paired", "mode": "fwd"})
