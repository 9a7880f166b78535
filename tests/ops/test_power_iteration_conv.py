"""power_iteration_conv against the SVD of the convolution's explicit matrix (float64)."""
from __future__ import annotations

import random

import pytest
import torch

from gloro_fast.ops import power_iteration_conv, power_iteration_conv_reference
from gloro_fast.ops.convolution import conv_operator, conv_operator_adjoint, normalize_padding
from tests.helpers import explicit_matrix

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def naive_conv(x, weight, stride, pads, dilation, groups):
    """Zero-padded, strided, dilated, grouped cross-correlation by explicit loops over
    the kernel taps: an implementation independent of F.conv2d."""
    top, bottom, left, right = pads
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    xp = x.new_zeros(n, c_in, h + top + bottom, w + left + right)
    xp[:, :, top : top + h, left : left + w] = x
    ho = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = x.new_zeros(n, c_out, ho, wo)
    c_out_g = c_out // groups
    for g in range(groups):
        xs = xp[:, g * c_in_g : (g + 1) * c_in_g]
        ws = weight[g * c_out_g : (g + 1) * c_out_g]
        for a in range(kh):
            for b in range(kw):
                r0, c0 = a * dilation[0], b * dilation[1]
                patch = xs[:, :, r0 : r0 + stride[0] * (ho - 1) + 1 : stride[0],
                           c0 : c0 + stride[1] * (wo - 1) + 1 : stride[1]]
                out[:, g * c_out_g : (g + 1) * c_out_g] += torch.einsum("nchw,oc->nohw", patch, ws[:, :, a, b])
    return out


def make_configs(count=48, seed=7):
    """A reproducible random sample of the grid, always including a few hand-picked corners."""
    rng = random.Random(seed)
    configs = [
        # (c_in, c_out, groups, k, stride, padding, dilation, (H, W))
        (1, 1, 1, (1, 1), (1, 1), 0, (1, 1), (1, 1)),
        (2, 3, 1, (3, 3), (1, 1), 1, (1, 1), (5, 5)),
        (2, 2, 2, (4, 4), (2, 2), (1, 2, 1, 2), (1, 1), (8, 8)),
        (2, 4, 2, (2, 3), (3, 2), (0, 1), (2, 1), (7, 6)),
        (3, 2, 1, (3, 2), (2, 3), (2, 0, 1, 3), (2, 2), (6, 7)),
        (1, 2, 1, (4, 4), (3, 3), (0, 0, 0, 0), (1, 1), (4, 4)),  # kernel = input
        (2, 2, 1, (1, 1), (1, 1), 2, (1, 1), (3, 4)),  # padding wider than the kernel
        (1, 1, 1, (2, 1), (2, 1), (3, 1), (1, 1), (3, 3)),
        (2, 2, 2, (2, 2), (3, 3), (3, 0, 0, 3), (2, 2), (4, 5)),
        (1, 2, 1, (3, 3), (2, 2), (0, 3, 3, 0), (1, 1), (2, 2)),  # padding-only windows
    ]
    while len(configs) < count:
        groups = rng.choice([1, 2])
        c_in = groups * rng.choice([1, 2])
        c_out = groups * rng.choice([1, 2])
        k = (rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 4]))
        stride = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3]))
        dilation = (rng.choice([1, 2]), rng.choice([1, 2]))
        kind = rng.choice(["int", "pair", "quad"])
        if kind == "int":
            padding = rng.choice([0, 1, 2])
        elif kind == "pair":
            padding = (rng.choice([0, 1, 2]), rng.choice([0, 1, 2]))
        else:
            padding = tuple(rng.choice([0, 1, 2, 3]) for _ in range(4))
        pads = normalize_padding(padding)
        hw = (rng.choice([3, 4, 5, 6, 7]), rng.choice([3, 4, 5, 6, 7]))
        if any(hw[a] + pads[2 * a] + pads[2 * a + 1] < dilation[a] * (k[a] - 1) + 1 for a in range(2)):
            continue
        configs.append((c_in, c_out, groups, k, stride, padding, dilation, hw))
    return configs


CONFIGS = make_configs()


def cfg_id(cfg):
    c_in, c_out, g, k, s, p, d, hw = cfg
    return f"c{c_in}-{c_out}g{g}k{k[0]}{k[1]}s{s[0]}{s[1]}p{p}d{d[0]}{d[1]}hw{hw[0]}x{hw[1]}".replace(" ", "")


def make_weight(cfg, gen):
    c_in, c_out, groups, k, *_ = cfg
    return torch.randn(c_out, c_in // groups, *k, generator=gen, dtype=F64)


def unit_iterate(c, hw, gen):
    u = torch.randn(1, c, *hw, generator=gen, dtype=F64)
    return u / torch.linalg.vector_norm(u)


def op_args(cfg):
    _, _, groups, _, stride, padding, dilation, _ = cfg
    return stride, normalize_padding(padding), dilation, groups


def converge(weight, u, chunk=10, tol=1e-13, max_calls=2000, **kw):
    u, sigma = power_iteration_conv(weight, u, 0, **kw)
    for _ in range(max_calls):
        u, new = power_iteration_conv(weight, u, chunk, **kw)
        if abs(float(new) - float(sigma)) <= tol * abs(float(new)):
            return u, new
        sigma = new
    raise AssertionError("power iteration did not converge")


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_conv_operator_matches_naive_loops(cfg, gen):
    c_in, *_, hw = cfg
    w = make_weight(cfg, gen)
    x = torch.randn(2, c_in, *hw, generator=gen, dtype=F64)
    stride, pads, dilation, groups = op_args(cfg)
    got = conv_operator(x, w, stride, pads, dilation, groups)
    torch.testing.assert_close(got, naive_conv(x, w, stride, pads, dilation, groups), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_adjoint_is_exact_transpose(cfg, gen):
    c_in, *_, hw = cfg
    w = make_weight(cfg, gen)
    args = op_args(cfg)
    a = explicit_matrix(lambda x: conv_operator(x, w, *args), (c_in, *hw))
    out_shape = conv_operator(torch.zeros(1, c_in, *hw, dtype=F64), w, *args).shape[1:]
    at = explicit_matrix(lambda v: conv_operator_adjoint(v, w, *args, hw), tuple(out_shape))
    assert at.shape == (a.shape[1], a.shape[0])
    torch.testing.assert_close(at, a.t(), rtol=0, atol=1e-12)
    # ⟨A u, v⟩ = ⟨u, Aᵀ v⟩ on random vectors
    u = torch.randn(1, c_in, *hw, generator=gen, dtype=F64)
    v = torch.randn(1, *out_shape, generator=gen, dtype=F64)
    lhs = (conv_operator(u, w, *args) * v).sum()
    rhs = (u * conv_operator_adjoint(v, w, *args, hw)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * (1 + abs(float(lhs)))


def gap_ratio(a):
    """s_k / s_1 for the largest singular value s_k distinct from s_1 (0 if none): power
    iteration converges like this ratio to the power 2k."""
    s = torch.linalg.svdvals(a)
    rest = s[s < s[0] * (1 - 1e-9)]
    return float(rest[0] / s[0]) if rest.numel() else 0.0


def gapped_weight(draw, matrix_of, tries=20, good=0.95):
    """A random kernel whose operator has a usable spectral gap: the first draw with
    ratio <= good, else the best of ``tries`` draws. Returns (weight, explicit matrix)."""
    best = None
    for _ in range(tries):
        w = draw()
        a = matrix_of(w)
        ratio = gap_ratio(a)
        if best is None or ratio < best[0]:
            best = (ratio, w, a)
        if ratio <= good:
            break
    return best[1], best[2]


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_converges_to_top_singular_value(cfg, gen):
    c_in, c_out, groups, *_, hw = cfg
    stride, pads, dilation, groups = op_args(cfg)

    def draw():
        w = make_weight(cfg, gen)
        w[: c_out // groups] *= 1.5  # separate the groups' blocks of the block-diagonal operator
        return w

    w, a = gapped_weight(
        draw, lambda w: explicit_matrix(lambda x: naive_conv(x, w, stride, pads, dilation, groups), (c_in, *hw))
    )
    exact = float(torch.linalg.matrix_norm(a, ord=2))
    u0 = unit_iterate(c_in, hw, gen)
    kw = dict(stride=stride, padding=cfg[5], dilation=dilation, groups=groups)
    _, first = power_iteration_conv(w, u0, 1, **kw)
    assert float(first) <= exact * (1 + 1e-12)  # a lower bound
    u, sigma = converge(w, u0, **kw)
    assert float(sigma) <= exact * (1 + 1e-12)
    assert abs(float(sigma) - exact) <= 1e-5 * exact
    assert u.shape == u0.shape and abs(float(u.norm()) - 1) < 1e-12


RESIDUAL = [
    # (channels, k, padding, dilation, (H, W))
    (1, (3, 3), 1, (1, 1), (5, 5)),
    (2, (3, 3), 1, (1, 1), (4, 6)),
    (2, (2, 2), (0, 1, 0, 1), (1, 1), (5, 4)),
    (2, (3, 3), 2, (2, 2), (6, 5)),
    (3, (1, 1), 0, (1, 1), (3, 3)),
    (2, (4, 2), (1, 2, 1, 0), (1, 1), (4, 5)),
]


@pytest.mark.parametrize("cfg", RESIDUAL)
def test_residual_is_identity_plus_conv(cfg, gen):
    c, k, padding, dilation, hw = cfg
    pads = normalize_padding(padding)

    def conv_matrix(w):
        return explicit_matrix(lambda x: naive_conv(x, w, (1, 1), pads, dilation, 1), (c, *hw))

    w, _ = gapped_weight(
        lambda: torch.randn(c, c, *k, generator=gen, dtype=F64) * 0.5,
        lambda w: torch.eye(c * hw[0] * hw[1], dtype=F64) + conv_matrix(w),
    )
    conv = conv_matrix(w)
    a = torch.eye(conv.shape[0], dtype=F64) + conv
    # the operator and its adjoint with residual=True
    got = explicit_matrix(lambda x: conv_operator(x, w, (1, 1), pads, dilation, 1, residual=True), (c, *hw))
    torch.testing.assert_close(got, a, rtol=0, atol=1e-12)
    got_t = explicit_matrix(
        lambda v: conv_operator_adjoint(v, w, (1, 1), pads, dilation, 1, hw, residual=True), (c, *hw)
    )
    torch.testing.assert_close(got_t, a.t(), rtol=0, atol=1e-12)
    exact = float(torch.linalg.matrix_norm(a, ord=2))
    _, sigma = converge(w, unit_iterate(c, hw, gen), padding=padding, dilation=dilation, residual=True)
    assert abs(float(sigma) - exact) <= 1e-5 * exact
    # tighter than 1 + ‖conv‖ in general, never above it
    assert float(sigma) <= 1 + float(torch.linalg.matrix_norm(conv, ord=2)) + 1e-9


def test_one_step_matches_explicit_matrix(gen):
    w = torch.randn(3, 2, 3, 2, generator=gen, dtype=F64)
    kw = dict(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
    a = explicit_matrix(lambda x: naive_conv(x, w, (2, 1), (1, 0, 2, 1), (1, 2), 1), (2, 5, 6))
    u0 = unit_iterate(2, (5, 6), gen)
    u1, sigma = power_iteration_conv(w, u0, 1, **kw)
    expect = a.t() @ (a @ u0.flatten())
    expect = expect / expect.norm()
    torch.testing.assert_close(u1.flatten(), expect, rtol=1e-12, atol=1e-13)
    assert abs(float(sigma) - float((a @ expect).norm())) < 1e-12
    # n_iter=0: σ̂ = ‖A u‖ with u as given, u unchanged
    u_same, s0 = power_iteration_conv(w, u0, 0, **kw)
    torch.testing.assert_close(u_same, u0, rtol=0, atol=0)
    assert abs(float(s0) - float((a @ u0.flatten()).norm())) < 1e-12


def test_zero_kernel_keeps_iterate(gen):
    w = torch.zeros(2, 2, 3, 3, dtype=F64)
    u0 = unit_iterate(2, (4, 4), gen)
    u, sigma = power_iteration_conv(w, u0, 4, padding=1)
    torch.testing.assert_close(u, u0, rtol=0, atol=0)
    assert float(sigma) == 0.0


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("value", [3e30, float("inf"), float("nan")])
def test_overflowing_or_non_finite_kernel_keeps_iterate(gen, value, backend):
    """A kernel whose images overflow float32 squares (norm +inf), or with an infinite or
    NaN entry: the iterate is kept, as for a zero kernel (never zeros or NaN for good)."""
    from gloro_fast.ops import use_backend

    w = torch.ones(2, 2, 3, 3)
    w[1, 0, 1, 1] = value
    u0 = unit_iterate(2, (4, 4), gen).float()
    with use_backend(backend):
        u, _ = power_iteration_conv(w, u0, 3, padding=1)
    torch.testing.assert_close(u, u0, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_zero_layer_in_a_batch_keeps_its_iterate_alone(gen, backend):
    """Batched layers: a zero kernel keeps its own iterate; the other layer iterates as it
    would alone (the keep-old check is per layer, after the loop)."""
    from gloro_fast.ops import power_iteration_conv_batched, use_backend

    ws = [torch.zeros(2, 2, 3, 3, dtype=F64), torch.randn(2, 2, 3, 3, generator=gen, dtype=F64)]
    us = [unit_iterate(2, (4, 4), gen), unit_iterate(2, (4, 4), gen)]
    with use_backend(backend):
        new_us, sigmas = power_iteration_conv_batched(ws, us, 5, padding=1)
        alone_u, alone_s = power_iteration_conv(ws[1], us[1], 5, padding=1)
    torch.testing.assert_close(new_us[0], us[0], rtol=0, atol=0)
    assert float(sigmas[0]) == 0.0
    torch.testing.assert_close(new_us[1], alone_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigmas[1], alone_s, rtol=1e-12, atol=1e-12)


def test_a_non_finite_iterate_is_not_kept(gen):
    """power_iterate: a result that is not finite (a NaN kernel) returns the starting iterate."""
    from gloro_fast.ops._power_iteration_common import power_iterate

    u0 = unit_iterate(2, (4, 4), gen)
    out = power_iterate(lambda x: x * float("nan"), u0, 3)
    torch.testing.assert_close(out, u0, rtol=0, atol=0)
    batched = power_iterate(lambda x: x * torch.tensor([float("nan"), 2.0], dtype=F64).reshape(1, 2, 1, 1),
                            torch.cat([u0[:, :1], u0[:, 1:]], dim=1), 2, blocks=2)
    torch.testing.assert_close(batched[:, :1], u0[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(batched[:, 1:], u0[:, 1:] / u0[:, 1:].norm(), rtol=1e-12, atol=1e-12)


def test_reference_matches_entry(gen):
    w = torch.randn(2, 1, 3, 3, generator=gen, dtype=F64)
    u0 = unit_iterate(2, (5, 5), gen)
    a = power_iteration_conv(w, u0, 3, stride=2, padding=(1, 0, 0, 1), groups=2)
    b = power_iteration_conv_reference(w, u0, 3, (2, 2), (1, 0, 0, 1), (1, 1), 2, False)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_gradient_formula(gen):
    w = torch.randn(2, 2, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    kw = dict(stride=2, padding=(0, 1, 1, 0))
    u, sigma = power_iteration_conv(w, unit_iterate(2, (6, 5), gen), 3, **kw)
    assert not u.requires_grad and sigma.requires_grad
    sigma.backward()
    # ∂‖A(w) u‖/∂w = ⟨A(w)u, A(∂w) u⟩ / σ̂ = (Aᵀ... ) computed by finite differences of the
    # explicit (linear in w) map w ↦ A(w) u
    wd = w.detach()
    au = naive_conv(u, wd, (2, 2), (0, 1, 1, 0), (1, 1), 1).flatten()
    jac = explicit_matrix(lambda ws: torch.stack([naive_conv(u, x, (2, 2), (0, 1, 1, 0), (1, 1), 1)[0] for x in ws]),
                          tuple(wd.shape))
    expect = (jac.t() @ au / au.norm()).reshape(wd.shape)
    torch.testing.assert_close(w.grad, expect, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=1, dilation=1, groups=1, residual=False),
        dict(stride=2, padding=(0, 2, 1, 0), dilation=(1, 2), groups=2, residual=False),
        dict(stride=1, padding=1, dilation=1, groups=1, residual=True),
    ],
)
def test_gradcheck(kw, gen):
    groups = kw["groups"]
    w = torch.randn(2, 2 // groups, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    u, _ = power_iteration_conv(w.detach(), unit_iterate(2, (5, 4), gen), 2, **kw)

    def fn(weight):
        return power_iteration_conv(weight, u, 0, **kw)[1]

    assert torch.autograd.gradcheck(fn, (w,), eps=1e-6, atol=1e-8)


def _bad_cases():
    w = torch.randn(4, 2, 3, 3, dtype=F64)
    u = torch.randn(1, 2, 5, 5, dtype=F64)
    call = power_iteration_conv
    return [
        ("iterate-channels", lambda: call(w, torch.randn(1, 3, 5, 5, dtype=F64)), ValueError, "iterate"),
        ("iterate-batch", lambda: call(w, torch.randn(2, 2, 5, 5, dtype=F64)), ValueError, "iterate"),
        ("iterate-3d", lambda: call(w, u[0]), ValueError, "iterate"),
        ("weight-2d", lambda: call(w[0, 0], u), ValueError, "weight"),
        ("weight-int", lambda: call(w.long(), u), TypeError, "weight"),
        ("iterate-int", lambda: call(w, u.long()), TypeError, "iterate"),
        ("dtype", lambda: call(w, u.float()), ValueError, "iterate"),
        ("device", lambda: call(w, u.to("meta")), ValueError, "iterate"),
        ("groups-not-dividing-out",
         lambda: call(torch.randn(3, 1, 3, 3, dtype=F64), u, groups=2), ValueError, "groups"),
        ("groups-not-dividing-in",
         lambda: call(torch.randn(4, 1, 3, 3, dtype=F64), torch.randn(1, 3, 5, 5, dtype=F64), groups=2),
         ValueError, "iterate"),
        ("groups-zero", lambda: call(w, u, groups=0), ValueError, "groups"),
        ("residual-stride",
         lambda: call(torch.randn(2, 2, 3, 3, dtype=F64), u, stride=2, padding=1, residual=True),
         ValueError, "residual"),
        ("residual-channels", lambda: call(w, u, padding=1, residual=True), ValueError, "residual"),
        ("residual-no-padding",
         lambda: call(torch.randn(2, 2, 3, 3, dtype=F64), u, residual=True), ValueError, "residual"),
        ("kernel-too-big",
         lambda: call(torch.randn(1, 2, 7, 3, dtype=F64), u, padding=0), ValueError, "height"),
        ("dilated-kernel-too-big",
         lambda: call(w, u, dilation=(1, 3), padding=(1, 0)), ValueError, "width"),
        ("n-iter", lambda: call(w, u, -1), ValueError, "n_iter"),
        ("stride-zero", lambda: call(w, u, stride=0), ValueError, "stride"),
        ("stride-float", lambda: call(w, u, stride=1.5), TypeError, "stride"),
        ("dilation-triple", lambda: call(w, u, dilation=(1, 1, 1)), TypeError, "dilation"),
        ("padding-negative", lambda: call(w, u, padding=-1), ValueError, "padding"),
        ("padding-triple", lambda: call(w, u, padding=(1, 1, 1)), ValueError, "padding"),
        ("padding-string", lambda: call(w, u, padding="same"), ValueError, "padding"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, fn, exc, name = case
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value)


def test_kernel_exactly_fits_is_accepted(gen):
    # padded size == dilated kernel size is the smallest valid input (output 1×1)
    w = torch.randn(1, 1, 3, 3, generator=gen, dtype=F64)
    u = unit_iterate(1, (1, 1), gen)
    _, sigma = power_iteration_conv(w, u, 2, padding=1)
    assert abs(float(sigma) - abs(float(w[0, 0, 1, 1]))) < 1e-12
