"""sound_decision: the sound test in one op — the C++ CPU kernel against the reference
(LinearForms.evaluate then decide, what the frozen model runs) bit for bit over random and
adversarial inputs (NaN and infinite logits and norms, ties, radii beyond the overflow
limit, every logits dtype), the reference against an independent per-sample float64 loop
of the decision rule, a real network's forms, the argument checks, opcheck, and
GloroNet.certify built on it."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast.models import cnn_2C2F
from gloro_fast.ops import sound_decision, sound_decision_reference, use_backend
from gloro_fast.sound.decision import TINY, LinearForms, decide
from gloro_fast.sound.rounding import U64, gamma, up
from tests.ops.cpp_helpers import has_cpu_kernels

needs_cpp = pytest.mark.skipif(not has_cpu_kernels("sound_decision"), reason="gloro_fast._C without sound_decision")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def make_forms(m, n, seed, cap=1e300):
    g = torch.Generator().manual_seed(seed)
    matrix = torch.rand(m, 4 + n, generator=g, dtype=torch.float64) * 0.05
    matrix[torch.rand(m, 4 + n, generator=g) < 0.2] = TINY
    slopes = torch.rand(4 + n, generator=g, dtype=torch.float64) * 3
    slopes[torch.rand(4 + n, generator=g) < 0.3] = 0.0
    return LinearForms(matrix, slopes, slopes.clamp_min(torch.finfo(torch.float64).tiny), slopes > 0,
                       up(1.0 + gamma(m, U64)), cap)


def make_batch(b, c, m, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, c, generator=g) * 3).to(dtype)
    if b >= 8 and c >= 2:
        logits[1, 0] = math.nan
        logits[2, c - 1] = math.inf
        logits[3, :] = logits[3, 0]             # ties everywhere
        logits[4, 1] = -math.inf
        logits[5, :] = math.nan
        logits[6, 1] = logits[6].max() + 0.001  # a near tie with its neighbours
    basis = torch.rand(b, m, generator=g, dtype=torch.float64) * 50
    basis[:, -1] = 1.0
    if b >= 12:
        basis[7, 0] = math.inf
        basis[8, 0] = math.nan
        basis[9, 0] = 1e308                     # the limits overflow the cap
        basis[10, :-1] = 0.0
    w = torch.randn(c, 5, generator=g, dtype=torch.float64)
    distances = torch.cdist(w, w) * 1.01
    return logits, distances, basis


def independent(logits, distances, basis, forms, eps):
    """The decision rule of docs/soundness.md evaluated sample by sample in Python floats with
    the same roundings up (f_⊥ and certified), written without the reference's tensors."""
    up_, eta, ulp, down = 1.0 + 2.0 ** -50, 2.0 ** -1022, 2.0 ** -50, 1.0 - 2.0 ** -50

    def rup(x):
        y = x * up_ + eta
        return math.inf if math.isnan(y) else y

    def rup_signed(x):
        return x + (abs(x) * ulp + eta)

    M, sl = forms.matrix.tolist(), forms.slopes.tolist()
    out = []
    for f, n in zip(logits.double().tolist(), basis.tolist()):
        vals = []
        for k in range(len(sl)):
            acc = n[0] * M[0][k]
            for r in range(1, len(n)):
                acc = acc + n[r] * M[r][k]
            vals.append(rup(acc * forms.factor))
        rooms = []
        for k in range(4, len(sl)):
            room = (forms.cap - vals[k]) / max(sl[k], 2.0 ** -1022)
            room = room * down if sl[k] > 0 else math.inf
            rooms.append(room if vals[k] <= forms.cap else -math.inf)
        eps_max = min(rooms) if all(math.isfinite(v) for v in n) else -math.inf
        top = max(range(len(f)), key=lambda i: (math.isnan(f[i]), f[i] if not math.isnan(f[i]) else 0, -i))
        s1 = rup(vals[0] + rup(eps * sl[0]))
        s0 = rup(vals[1] + rup(eps * sl[1]))
        rivals = [rup_signed(f[i] + rup(distances[top][i].item() * s1)) for i in range(len(f)) if i != top]
        rival = -math.inf if not rivals else (math.nan if any(map(math.isnan, rivals)) else max(rivals))
        bottom = rup_signed(rival + s0)
        ok = all(math.isfinite(v) for v in f) and eps_max >= eps and not math.isnan(bottom)
        out.append((bottom if ok else math.inf, ok and f[top] > bottom, top))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,c,m,n", [(16, 10, 5, 4), (13, 2, 2, 1), (9, 100, 7, 8), (0, 10, 5, 4), (12, 1, 3, 2)])
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 1e200])
def test_kernels_give_the_reference_bits(backend, b, c, m, n, eps):
    forms = make_forms(m, n, seed=b + c + m)
    logits, distances, basis = make_batch(b, c, m, seed=7 * b + n)
    want = decide(logits, distances, forms.evaluate(basis), eps)
    with use_backend(backend):
        got = sound_decision(logits, distances, basis, forms, eps)
    for g_, w_ in zip(got, want):
        assert g_.dtype == w_.dtype and g_.shape == (b,)
        assert torch.equal(g_, w_)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_every_logits_dtype_and_a_tight_cap(backend, dtype):
    forms = make_forms(4, 3, seed=1, cap=2e3)      # some samples' limits exceed the cap
    logits, distances, basis = make_batch(40, 10, 4, seed=3, dtype=dtype)
    for eps in (0.0, 0.1, 5.0):
        want = sound_decision_reference(logits, distances, basis, forms.matrix, forms.slopes, forms.safe_slopes,
                                        forms.has_slope, forms.factor, forms.cap, eps)
        with use_backend(backend):
            got = sound_decision(logits, distances, basis, forms, eps)
        assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want))


def test_reference_follows_the_decision_rule_sample_by_sample():
    forms = make_forms(5, 4, seed=2, cap=1e4)
    logits, distances, basis = make_batch(16, 6, 5, seed=11)
    for eps in (0.0, 0.2, 30.0):
        bottom, certified, top = sound_decision_reference(
            logits, distances, basis, forms.matrix, forms.slopes, forms.safe_slopes, forms.has_slope, forms.factor,
            forms.cap, eps)
        for i, (want_bottom, want_cert, want_top) in enumerate(independent(logits, distances, basis, forms, eps)):
            assert int(top[i]) == want_top
            assert bool(certified[i]) == want_cert
            assert float(bottom[i]) == want_bottom or (math.isnan(want_bottom) and math.isnan(float(bottom[i])))
        assert certified.any() or eps > 0  # the cases decide something


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trained_shape_network_certifies_as_the_allowance_path(backend):
    torch.manual_seed(0)
    model = cnn_2C2F(input_shape=(1, 28, 28), num_classes=10).eval()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, sb, allowance = model.sound_forward(x)
        with use_backend(backend):
            for eps in (0.0, 0.003, 0.3):
                want = sb.bottom(logits, allowance, eps)[1]
                top = logits.argmax(dim=1)
                expected = torch.where(want, top, torch.full_like(top, 10))
                assert torch.equal(model.certify(x, epsilon=eps), expected)
                assert torch.equal(model.certify(x, epsilon=eps), model(x).argmax(dim=1)) or eps != model.epsilon


def test_argument_checks():
    forms = make_forms(3, 2, seed=0)
    logits, distances, basis = make_batch(4, 5, 3, seed=0)
    with pytest.raises(ValueError, match="distances must be float64 of shape"):
        sound_decision(logits, distances.float(), basis, forms, 0.1)
    with pytest.raises(ValueError, match="basis must be float64 of shape"):
        sound_decision(logits, distances, basis[:, :2], forms, 0.1)
    with pytest.raises(ValueError, match="logits"):
        sound_decision(logits[0], distances, basis, forms, 0.1)
    with pytest.raises(ValueError, match="one device"):
        sound_decision(logits.to("meta"), distances, basis, forms, 0.1)


@needs_cpp
def test_opcheck():
    forms = make_forms(3, 2, seed=0)
    logits, distances, basis = make_batch(12, 5, 3, seed=0)
    args = (logits, distances, basis, forms.matrix, forms.slopes, forms.safe_slopes, forms.has_slope, forms.factor,
            forms.cap, 0.1)
    with use_backend("cpp"):
        torch.library.opcheck(torch.ops.gloro_fast.sound_decision.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
