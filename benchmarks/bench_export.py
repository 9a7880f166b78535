"""The frozen / exported model against the plain network (cnn_6C2F, CIFAR-10 shapes, B=256).

- case ``frozen model``: ``plain`` is the network alone as torch.nn layers (the frozen
  model's body and head under ``no_grad``: logits only, no certificate); ``frozen[sound]`` /
  ``frozen[estimate]`` are :func:`gloro_fast.export.freeze`'s module (logits [f, f_⊥], the
  certificate included); ``pt2[sound]`` the ``torch.export`` program of it, run by
  ``ExportedProgram.module()``; ``gloro_fast network`` the live model's body and head (its
  gloro_fast.nn layers, no certificate), for reference. Target: frozen[sound] throughput
  ≥ 0.99× plain.
- case ``frozen vs plain, paired``: a shared machine's load drifts by more than the 1 % the
  target is about, so the same two calls also run as interleaved pairs (the order alternating
  from pair to pair); the record carries the median of the per-pair throughput ratios
  plain time / frozen time and its spread, which ``report.py`` uses for the target.
- case ``onnxruntime`` (CPU only): the same in ONNX Runtime, ``plain`` being the network
  alone exported the same way.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

from benchmarks.harness import DEVICE, DTYPE, pick, record_skip, run_case
from gloro_fast.export import ExportedOutputs, FrozenGloroNet, MinMax, export_pt2, freeze, to_onnx
from gloro_fast.models import cnn_6C2F
from gloro_fast.nn.conv import channels_last

BATCH = pick(256, 64)
ROUNDS = pick(9, 3)   # ratios near 1: more rounds than the default policy gives 1 s calls
_CACHE = {}


def setup_models():
    """The model, its two frozen forms and the input batch, built once (freezing 6C2F
    computes its sound bounds: ~20 s on 2 cores)."""
    if not _CACHE:
        torch.manual_seed(0)
        model = cnn_6C2F(input_shape=(3, 32, 32), num_classes=10).to(DEVICE, DTYPE).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.rand(BATCH, 3, 32, 32, generator=g).to(DEVICE, DTYPE)
        _CACHE.update(model=model, x=x, sound=freeze(model, "sound"), estimate=freeze(model, "estimate"))
    return _CACHE


FROZEN_CONTENDERS = ("plain", "frozen[sound]", "frozen[estimate]", "pt2[sound]", "gloro_fast network")


def plain_network(frozen):
    """The torch.nn network alone: logits, no certificate (the estimate's frozen body is
    the plain torch.nn one; the sound one sums its dense layers in blocks)."""
    def fn(x):
        with torch.no_grad():
            return frozen.head(frozen.body(x))
    return fn


@pytest.mark.parametrize("contender", FROZEN_CONTENDERS)
def test_frozen_model(benchmark, contender, tmp_path):
    m = setup_models()
    model, x = m["model"], m["x"]
    if contender == "plain":
        plain = plain_network(m["estimate"])

        def fn():
            return plain(x)
    elif contender == "gloro_fast network":
        def fn():
            with torch.no_grad():
                return model.head(model.body(x))
    elif contender.startswith("frozen"):
        frozen: FrozenGloroNet = m[contender[len("frozen["):-1]]

        def fn():
            return frozen(x)
    else:
        path = tmp_path / "model.pt2"
        export_pt2(m["sound"], path)
        program = torch.export.load(str(path)).module()

        def fn():
            with torch.no_grad():
                return program(x)[0]
    run_case(benchmark, fn, case=f"frozen model 6C2F B={BATCH}", contender=contender,
             params={"model": "6C2F", "B": BATCH}, size=BATCH, min_rounds=ROUNDS,
             extra={"op": "export", "mode": "fwd"})


class _Plain(torch.nn.Module):
    """The frozen model's network alone: logits, no certificate."""

    def __init__(self, frozen):
        super().__init__()
        self.body, self.head = frozen.body, frozen.head

    def forward(self, x):
        return self.head(self.body(x))


PAIRS = pick(21, 5)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("certificate", ("sound", "estimate"))
def test_frozen_paired(benchmark, certificate, layout):
    """Against the plain network as torch.nn runs it (NCHW) and in the channels_last layout
    a user can ask for (weights and input; on the CPU the frozen model, as the live
    certifying pass, runs its convolutions channels_last)."""
    m = setup_models()
    x, frozen = m["x"], m[certificate]
    source = m["estimate"]  # nn.Linear (the sound body's dense layers sum in blocks)
    x_plain = x
    if layout == "channels_last":  # a copy: the frozen models keep their own weights
        source = _Plain(copy.deepcopy(source)).to(memory_format=torch.channels_last)
        for m in source.modules():  # MinMax as users have it: output in its input's layout
            if isinstance(m, MinMax):
                m.contiguous_out = False
        x_plain = channels_last(x)
    network = plain_network(source)

    def plain():
        return network(x_plain)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    ratios = []

    def pair():
        if len(ratios) % 2:
            t_frozen, t_plain = timed(lambda: frozen(x)), timed(plain)
        else:
            t_plain, t_frozen = timed(plain), timed(lambda: frozen(x))
        ratios.append(t_plain / t_frozen)

    where = "" if layout == "nchw" else " in channels_last"
    run_case(benchmark, pair, case=f"frozen vs plain{where}, paired, 6C2F B={BATCH}",
             contender=f"paired[{certificate}]", params={"model": "6C2F", "B": BATCH, "layout": layout},
             size=BATCH, min_rounds=PAIRS, measure_memory=False,
             extra={"op": "export_paired" if layout == "nchw" else "export_paired_cl", "mode": "fwd"})
    q = statistics.quantiles(ratios, n=4)
    benchmark.extra_info["paired"] = {"ratio_median": statistics.median(ratios), "q1": q[0], "q3": q[2],
                                      "min": min(ratios), "max": max(ratios), "pairs": len(ratios)}


ORT_CONTENDERS = ("plain", "onnxruntime[sound]", "onnxruntime[estimate]")


@pytest.mark.parametrize("contender", ORT_CONTENDERS)
def test_onnxruntime(benchmark, contender, tmp_path):
    case = f"onnxruntime 6C2F B={BATCH}"
    if DEVICE.type != "cpu":
        record_skip(case, contender, "ONNX Runtime's CPU provider: the CUDA one is not installed here")
    ort = pytest.importorskip("onnxruntime")
    m = setup_models()
    x = m["x"]
    batch = {"x": {0: torch.export.Dim("batch", min=1)}}
    if contender == "plain":
        frozen = m["estimate"]
        proto = to_onnx(_Plain(frozen), (x[:2],), batch, ["x"], ["logits"])
    else:
        proto = to_onnx(ExportedOutputs(m[contender[len("onnxruntime["):-1]]), (x[:2],), batch, ["x"],
                        ["logits", "certified", "radius"])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": x.cpu().numpy()}
    outputs = [session.get_outputs()[0].name]

    def fn():
        return session.run(outputs, feed)

    run_case(benchmark, fn, case=case, contender=contender, params={"model": "6C2F", "B": BATCH},
             size=BATCH, min_rounds=ROUNDS, measure_memory=False, extra={"op": "export", "mode": "fwd"})

