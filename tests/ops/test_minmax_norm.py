"""minmax_norm: MinMax and each sample's sum of squares in one pass — the reference against
an independent per-sample float64 loop, the compiled CPU kernel against the reference
(values, NaN, gradients, opcheck), the norm bound built from it against the exact norm, and
the certifying pass that uses it against the one that measures norms itself."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast import nn as gnn
from gloro_fast.ops import minmax_norm, minmax_norm_, minmax_norm_reference, use_backend
from gloro_fast.ops.minmax_norm import fused_minmax_norm
from gloro_fast.sound.forward_error import SumOfSquares, activation_norm_upper, norm_upper_from_sumsq, norm_uppers
from tests.ops.cpp_helpers import compiled_certify, has_cpu_kernels, recording_forward

SHAPES = [(3, 2), (5, 6), (4, 8, 5, 7), (1, 2, 1, 1), (7, 64, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
needs_cpp = pytest.mark.skipif(not has_cpu_kernels("minmax_norm"), reason="gloro_fast._C without minmax_norm")


def per_sample_loop(x):
    """(out, sumsq) one sample and one pair at a time, in float64 (independent of the op)."""
    n, c = x.shape[:2]
    out = torch.empty_like(x)
    sumsq = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for k in range(c // 2):
            a, b = x[i, k], x[i, k + c // 2]
            out[i, k] = torch.minimum(a, b)
            out[i, k + c // 2] = torch.maximum(a, b)
        sumsq[i] = math.fsum(float(v) ** 2 for v in x[i].flatten().tolist())
    return out, sumsq


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_a_per_sample_loop(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out, sumsq = minmax_norm_reference(x)
    ref_out, ref_sumsq = per_sample_loop(x)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(sumsq, ref_sumsq, rtol=1e-14, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with use_backend("cpp"):
        out, sumsq = minmax_norm(x)
    ref_out, ref_sumsq = minmax_norm_reference(x)
    assert out.dtype == dtype and sumsq.dtype == torch.float64
    assert torch.equal(out, ref_out)  # min and max are exact
    torch.testing.assert_close(sumsq, ref_sumsq, rtol=1e-13, atol=0)


@needs_cpp
def test_kernel_propagates_nan_and_inf_like_torch():
    x = torch.tensor([[1.0, float("nan"), 2.0, 0.5], [float("inf"), -1.0, 3.0, float("-inf")]])
    with use_backend("cpp"):
        out, sumsq = minmax_norm(x)
    ref_out, ref_sumsq = minmax_norm_reference(x)
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(out.nan_to_num(0.0), ref_out.nan_to_num(0.0))
    assert math.isnan(sumsq[0]) and sumsq[1] == math.inf
    bound = norm_upper_from_sumsq(sumsq, 4)
    assert not torch.isfinite(bound).any()  # fails closed: such a sample is never certified


def test_norm_uppers_takes_every_sum_at_once_bit_for_bit():
    """The batched bounds equal the formula applied to each sum alone (float64, any sizes,
    NaN and +inf failing closed); tensors already bounds pass through untouched."""
    from gloro_fast.sound.forward_error import activation_norm_constants
    from gloro_fast.sound.rounding import up_tensor

    g = torch.Generator().manual_seed(4)
    sums = [torch.rand(5, generator=g, dtype=torch.float64) * 10.0 ** k for k in (-30, 0, 30)]
    sums[1][2], sums[2][0] = math.nan, math.inf
    known = torch.full((5,), 3.0, dtype=torch.float64)
    terms = [7, 1568, 3136]
    bounds = [SumOfSquares(sums[0], terms[0]), known, SumOfSquares(sums[1], terms[1]), SumOfSquares(sums[2], terms[2])]
    taken = norm_uppers(bounds)
    assert taken[1] is known and len(taken) == 4
    for got, s, m in zip(taken[:1] + taken[2:], sums, terms):
        factor, offset = activation_norm_constants((1, m), torch.float64)
        alone = up_tensor(up_tensor(torch.sqrt(s) * factor) + offset)
        assert torch.equal(got, alone)
        finite = torch.isfinite(s)
        assert (got[finite] >= torch.sqrt(s[finite])).all() and torch.isposinf(got[~finite]).all()
    assert norm_uppers([known]) == [known]


@needs_cpp
def test_kernel_takes_non_contiguous_input():
    x = torch.randn(6, 4, 5, 8, generator=torch.Generator().manual_seed(2)).transpose(2, 3)
    with use_backend("cpp"):
        out, sumsq = minmax_norm(x)
    ref_out, ref_sumsq = minmax_norm_reference(x)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(sumsq, ref_sumsq, rtol=1e-13, atol=0)


CHANNELS_LAST_SHAPES = [(5, 4, 3, 7), (3, 64, 2, 2), (2, 2, 5, 1), (2, 1030, 1, 3)]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=str)
def test_channels_last_input_is_read_in_place_and_gives_channels_last_output(backend, dtype, shape):
    """torch.compile hands convolution outputs over channels_last: the op reads them as they
    are and answers in the same layout (the fake kernel's strides: opcheck below), with the
    values of the per-sample loop; the backward's grad_x has x's layout too."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    with use_backend(backend):
        out, sumsq = torch.ops.gloro_fast.minmax_norm.default(x)
    ref_out, ref_sumsq = per_sample_loop(x.float().contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out.float(), ref_out)
    torch.testing.assert_close(sumsq, ref_sumsq, rtol=1e-13, atol=0)
    grad_out = torch.randn(shape, generator=g).to(dtype)  # contiguous: the kernel takes it in x's layout
    grad_sumsq = torch.randn(shape[0], dtype=torch.float64, generator=g)
    with use_backend(backend):
        grad_x = torch.ops.gloro_fast.minmax_norm_backward.default(grad_out, grad_sumsq, x)
        same_grad = torch.ops.gloro_fast.minmax_norm_backward.default(grad_out, grad_sumsq, x.contiguous())
    work = torch.float64 if dtype == torch.float64 else torch.float32  # bfloat16: computed in float32
    with use_backend("reference"):
        ref_grad = torch.ops.gloro_fast.minmax_norm_backward.default(
            grad_out.to(work), grad_sumsq, x.to(work).contiguous()).to(dtype)
    assert grad_x.is_contiguous(memory_format=torch.channels_last) and not grad_x.is_contiguous()
    assert torch.equal(grad_x, same_grad)  # per element the same arithmetic in either layout
    if backend == "cpp":  # one rounding to bfloat16 (the reference rounds each operation)
        assert torch.equal(grad_x, ref_grad)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES + [(4, 32, 7, 7)], ids=str)
def test_contiguous_out_writes_the_flattened_order_from_channels_last(backend, dtype, shape):
    """contiguous_out (a MinMax flattened next, in the CPU certifying pass): the same values
    and sums, written contiguous from a channels_last x, so that flatten is a view; the
    gradient comes back in x's layout with the values of the channels_last forward's."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = math.nan  # NaN propagates in this kernel too
    with use_backend(backend):
        out, sumsq = minmax_norm(x, contiguous_out=True)
        cl_out, cl_sumsq = minmax_norm(x)
        same = minmax_norm(x.contiguous(), contiguous_out=True)
    assert out.is_contiguous() and out.flatten(1).data_ptr() == out.data_ptr()
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(cl_out.contiguous()))
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(same[0]))
    ref_out, _ = per_sample_loop(x.float().contiguous())
    assert torch.equal(torch.nan_to_num(out.float()), torch.nan_to_num(ref_out))
    assert torch.equal(sumsq.isnan(), cl_sumsq.isnan())
    xg = x.detach().float().requires_grad_(True) if dtype == torch.bfloat16 else x.detach().requires_grad_(True)
    xg = xg.contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        y, s2 = minmax_norm(xg, contiguous_out=True)
        torch.nan_to_num(y).sum().backward()
        g1 = xg.grad.clone()
        xg.grad = None
        y, s2 = minmax_norm(xg)
        torch.nan_to_num(y).sum().backward()
    assert torch.equal(torch.nan_to_num(g1), torch.nan_to_num(xg.grad))


@needs_cpp
def test_opcheck_contiguous_out():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 6, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm.default, (x, True))


@needs_cpp
def test_opcheck_channels_last():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 6, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm.default, (x,))
    grad_out = torch.randn(3, 6, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    grad_sumsq = torch.randn(3, dtype=torch.float64, generator=g)
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm_backward.default, (grad_out, grad_sumsq, x))


@needs_cpp
def test_compiled_certify_hands_the_kernel_channels_last_activations():
    """With the op's flexible_layout tag, Inductor passes its channels_last convolution
    outputs straight to the kernel (no copy to contiguous and back around each MinMax), and
    the compiled certificate is the eager one. The MinMax right after a convolution is the
    overwriting op (minmax_norm_, which Inductor writes in place: the convolution's output
    is read by nothing else), whose argument, being mutated, is the buffer itself."""
    import torch._inductor.config as inductor_config

    from gloro_fast import GloroNet

    layouts = []
    torch.manual_seed(0)
    model = GloroNet(torch.nn.Sequential(
        gnn.Conv2d(3, 8, 3, padding=1), gnn.MinMax(), gnn.Conv2d(8, 8, 3, padding=1), gnn.MinMax(),
        gnn.Flatten()), gnn.Linear(8 * 6 * 6, 4), epsilon=0.01, input_shape=(3, 6, 6)).eval()
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    eager = model.certify(x)
    with (use_backend("cpp"), recording_forward("minmax_norm", "cpp", lambda t, *a: layouts.append(t.is_contiguous())),
          recording_forward("minmax_norm_", "cpp", lambda t: layouts.append(t.is_contiguous()))):
        compiled = compiled_certify(model, x)
    assert torch.equal(compiled, eager)
    assert layouts
    if inductor_config.layout_optimization:
        assert False in layouts  # at least one activation arrived channels_last, uncopied


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_gradient_against_float64_gradcheck(backend):
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: minmax_norm(t), (x,))
        # only one of the outputs used: the other gradient is absent
        out, _ = minmax_norm(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(g, torch.ones_like(x))


@needs_cpp
def test_opcheck():
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(4))
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm.default, (x,))
    grad_out = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(5))
    grad_sumsq = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm_backward.default, (grad_out, grad_sumsq, x))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 5), "even channel count"),
    (torch.zeros(4), "x must"),
    (torch.zeros(2, 4, dtype=torch.int64), "floating"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        minmax_norm(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_bound_holds_and_is_tight(dtype):
    """The bound from the float64 sum of squares is ≥ the exact norm (math.fsum of exact
    squares), within 1e-12 relative of it, also for tiny and huge entries."""
    gen = torch.Generator().manual_seed(7)
    scales = torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1e30], dtype=torch.float64)
    x = (torch.randn(5, 8, 9, dtype=torch.float64, generator=gen) * scales.view(5, 1, 1)).to(dtype)
    _, sumsq = minmax_norm_reference(x)
    bound = norm_upper_from_sumsq(sumsq, x[0].numel())
    for i in range(x.shape[0]):
        exact = math.sqrt(math.fsum(float(v) ** 2 for v in x[i].flatten().tolist()))
        assert bound[i] >= exact
        assert bound[i] <= exact * (1 + 1e-12) + 1e-150


@needs_cpp
def test_certifying_pass_with_fused_norms_certifies_as_with_measured_norms():
    """GloroNet.sound_forward takes the norms after each MinMax from the fused kernel (cpp
    backend) or measures them itself (reference backend): the same logits bit for bit, the
    same decisions, and radii at least as large (the float64 sum of squares bounds the norm
    more tightly than float32 norms do) and within 0.1 % of them."""
    from gloro_fast.models import cnn_2C2F

    torch.manual_seed(0)
    model = cnn_2C2F(input_shape=(1, 28, 28), num_classes=10, epsilon=0.05).eval()
    x = torch.rand(257, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    with use_backend("cpp"):
        assert fused_minmax_norm("cpu")
        logits_c, _, allowance_c = model.sound_forward(x)
        cert_c, radius_c = model.certify(x), model.certified_radius(x)
    with use_backend("reference"):
        assert not fused_minmax_norm("cpu")
        logits_r, _, allowance_r = model.sound_forward(x)
        cert_r, radius_r = model.certify(x), model.certified_radius(x)
    assert torch.equal(logits_c, logits_r)
    assert torch.equal(cert_c, cert_r)
    assert (radius_c >= radius_r).all() and (radius_r > 0).any()
    torch.testing.assert_close(radius_c, radius_r, rtol=1e-3, atol=0)
    assert (allowance_c.s1 <= allowance_r.s1).all() and (allowance_c.s0 <= allowance_r.s0).all()


def test_minmax_layer_passes_a_known_norm_on_and_measures_one_otherwise():
    layer = gnn.MinMax()
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(9))
    known = torch.full((3,), 7.0, dtype=torch.float64)
    out, norm = layer.certifying_forward_norm(x, known)
    assert torch.equal(out, layer(x)) and norm is known
    out, norm = layer.certifying_forward_norm(x, None)
    assert torch.equal(out, layer(x))
    if fused_minmax_norm("cpu"):
        assert isinstance(norm, SumOfSquares) and norm.terms == 20
        norm = norm_uppers([norm])[0]
        assert (norm >= activation_norm_upper(x) * (1 - 1e-6)).all()
        assert (norm >= torch.linalg.vector_norm(x.double().flatten(1), dim=1)).all()
    else:
        assert norm is None


# ---- minmax_norm_: the same pass written over x ----

OVERWRITE_SHAPES = [((5, 6), False), ((4, 8, 5, 7), False), ((7, 64, 3, 3), False), ((4, 8, 5, 7), True),
                    ((3, 32, 6, 6), True), ((2, 2, 1, 1), True)]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, last", OVERWRITE_SHAPES, ids=str)
def test_overwrite_gives_the_functional_values_in_x(backend, dtype, shape, last):
    """x becomes the per-sample loop's MinMax (its layout kept, the same storage), the sums
    are the loop's within float64 rounding and, on one backend, the functional op's bit for
    bit (each block's squares summed before it is overwritten)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    want_out, want_sumsq = per_sample_loop(x)
    with use_backend(backend):
        out, sumsq = minmax_norm(x)
        y = x.clone(memory_format=torch.preserve_format)
        ptr, strides, version = y.data_ptr(), y.stride(), y._version
        got = minmax_norm_(y)
    assert y.data_ptr() == ptr and y.stride() == strides and y._version > version
    assert torch.equal(y, want_out) and torch.equal(y, out)
    assert got.dtype == torch.float64 and torch.equal(got, sumsq)
    torch.testing.assert_close(got, want_sumsq, rtol=1e-12, atol=0)


@needs_cpp
def test_overwrite_opcheck():
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(11))
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm_.default, (x,))
    y = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(12))
    y = y.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.gloro_fast.minmax_norm_.default, (y,))


@pytest.mark.parametrize("make, error, match", [
    (lambda: torch.zeros(3, 5), ValueError, "even channel count"),
    (lambda: torch.zeros(2, 4, dtype=torch.int64), TypeError, "floating"),
    (lambda: torch.zeros(4, 6).t(), ValueError, "contiguous or channels_last"),
    (lambda: torch.zeros(3, 4, requires_grad=True), RuntimeError, "require grad"),
])
def test_overwrite_bad_input_is_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        minmax_norm_(make())


def test_overwrite_without_grad_mode_takes_a_tensor_that_requires_grad():
    x = torch.randn(3, 4, requires_grad=True)
    want = minmax_norm_reference(x.detach())[0]
    with torch.no_grad():
        minmax_norm_(x)
    assert torch.equal(x.detach(), want)
