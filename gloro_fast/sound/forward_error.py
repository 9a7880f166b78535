"""A priori bounds on the rounding error of a network's forward pass.

The network h = L_k ∘ … ∘ L_1 is evaluated in a floating-point format with unit
roundoff u. For an input x (exact: it is given in that format) write h_l for the exact
activations and h̃_l for the computed ones. Every bound here is *affine in ‖x‖₂*,
a·‖x‖ + b with a, b ≥ 0 computed once per set of weights, so that the per-sample cost of
using it is one norm of the input.

Per layer (with U ≥ Lip(L), α ≥ ‖|A|‖₂ for its linear part A, n its fan-in, β ≥ ‖L(0)‖):

- norm of the exact activation:   ‖h_l‖ ≤ U‖h_{l−1}‖ + β
- error:  ‖h̃_l − h_l‖ ≤ ‖L(h̃) − L(h)‖ + ‖fl(L)(h̃) − L(h̃)‖
                     ≤ U‖h̃_{l−1} − h_{l−1}‖ + γ_{n+k}(α‖h̃_{l−1}‖ + β) + (n+k)·η·√(numel)

where each output of an affine layer is a dot product of n terms plus k further additions
(bias, residual), any summation order (|fl(aᵀb) − aᵀb| ≤ γ_n|a|ᵀ|b|, so the error
vector is bounded by γ(|A||h̃| + |b|) entrywise and ‖|A||h̃|‖ ≤ α‖h̃‖), η the format's
smallest subnormal (products that underflow), and ‖h̃‖ ≤ ‖h‖ + ‖h̃ − h‖.
ReLU, MinMax, max-pooling, flattening and concatenation are exact in floating point and
1-Lipschitz: norm and error pass through unchanged.

*Overflow.* The bounds assume no overflow. Every partial sum of an affine layer is at
most α‖h̃‖ + β in magnitude (times 1 + γ computed), so requiring that to stay below half
the largest finite number gives a largest admissible ‖x‖ (``max_input_norm``); inputs
beyond it are never certified.

*Arithmetic assumed*: IEEE arithmetic in the model's dtype with classical (any-order)
summation for matrix products and convolutions — what CPU BLAS/oneDNN direct
convolutions and cuBLAS/cuDNN do in IEEE fp32/fp64. TF32 and reduced-precision
reductions are switched off while certifying (:func:`gloro_fast.sound.ieee_arithmetic`);
transform-based convolution algorithms (Winograd, FFT) are outside this model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .rounding import U64, gamma, largest_finite, underflow_unit, unit_roundoff, up, up_tensor, up_tensor_inner

__all__ = ["BOUND", "MEASURED", "SUM_OF_SQUARES", "Affine", "AffineStep", "Arithmetic", "ForwardBound", "MeasuredNorm",
           "NormBound", "SumOfSquares", "activation_norm_constants", "activation_norm_upper", "affine_layer",
           "exact_layer", "finish_norms", "ieee_arithmetic", "measured_norm", "norm_dtype", "norm_rows", "norm_terms",
           "norm_upper_from_sumsq", "norm_uppers", "sample_norm_constants"]


@dataclass(frozen=True)
class Affine:
    """a·r + b for r = ‖x‖ (a, b ≥ 0; arithmetic rounded up)."""

    a: float = 0.0
    b: float = 0.0

    def __call__(self, r: float) -> float:
        return up(up(self.a * r) + self.b)

    def __add__(self, other: "Affine") -> "Affine":
        return Affine(up(self.a + other.a), up(self.b + other.b))

    def scale(self, c: float) -> "Affine":
        return Affine(up(self.a * c), up(self.b * c))

    def shift(self, c: float) -> "Affine":
        return Affine(self.a, up(self.b + c))


@dataclass(frozen=True)
class Arithmetic:
    """The floating-point format a forward pass runs in."""

    dtype: torch.dtype
    u: float
    eta: float
    realmax: float

    @classmethod
    def of(cls, dtype: torch.dtype) -> "Arithmetic":
        return cls(dtype, unit_roundoff(dtype), underflow_unit(dtype), largest_finite(dtype))


@dataclass(frozen=True)
class AffineStep:
    """One affine layer's constants for the per-sample (a-posteriori) error bound of its
    ``certifying_forward``: its Lipschitz bound U, ‖|A|‖ bound α, γ of the longest rounding
    chain, ‖L(0)‖ bound β, the underflow term, and the Lipschitz bound of everything before it."""

    lipschitz: float
    abs_norm: float
    gamma: float
    offset: float
    underflow: float
    lipschitz_before: float


@dataclass(frozen=True)
class ForwardBound:
    """Affine-in-‖x‖ bounds after some layers: the activation shape (no batch axis), an
    upper bound of the Lipschitz constant so far, the exact activation's norm, the
    computed one's error, and the overflow limits met so far (each an Affine that must
    stay ≤ ``arith.realmax / 2``)."""

    shape: Tuple[int, ...]
    lipschitz: float = 1.0            # upper bound of the Lipschitz constant so far
    norm: Affine = field(default_factory=lambda: Affine(1.0, 0.0))
    error: Affine = field(default_factory=Affine)
    limits: Tuple[Affine, ...] = ()
    steps: Tuple[Optional[AffineStep], ...] = ()   # one per layer: None for exact layers

    def computed_norm(self) -> Affine:
        """‖h̃‖ ≤ ‖h‖ + ‖h̃ − h‖."""
        return self.norm + self.error

    def max_input_norm(self, arith: Arithmetic) -> float:
        """The largest ‖x‖ for which no limit exceeds half the largest finite number."""
        cap = arith.realmax / 2.0
        best = math.inf
        for lim in self.limits + (self.computed_norm(),):
            if not (math.isfinite(lim.a) and math.isfinite(lim.b)) or lim.b >= cap:
                return 0.0
            if lim.a > 0:
                best = min(best, (cap - lim.b) / up(lim.a) * (1.0 - 2.0 ** -40))
        return best


def affine_layer(bound: ForwardBound, out_shape, lipschitz: float, abs_norm: float, fan_in: int,
                 offset: float, arith: Arithmetic, additions: int = 1,
                 certifying_fan_in: Optional[int] = None) -> ForwardBound:
    """The bound after an affine layer L(h) = A h + c (see the module docstring):
    ``lipschitz`` ≥ ‖A‖, ``abs_norm`` ≥ ‖|A|‖, ``offset`` ≥ ‖c‖ (the whole output's),
    ``fan_in`` terms per dot product and ``additions`` more roundings per output.

    ``certifying_fan_in``: the longest chain of roundings a product goes through in the
    layer's ``certifying_forward`` (the evaluation the per-sample bound describes), when
    it is shorter than ``fan_in`` (e.g. a blocked dense layer: b + k − 1 for k blocks of b);
    the a-priori error keeps ``fan_in`` (it also covers the plain forward)."""
    terms = fan_in + additions
    g = gamma(terms, arith.u)
    computed = bound.computed_norm()
    reach = computed.scale(abs_norm).shift(offset)            # α‖h̃‖ + β
    numel = math.prod(out_shape)
    underflow = up(terms * arith.eta * math.sqrt(numel))
    local = reach.scale(g).shift(underflow)
    step_gamma = g if certifying_fan_in is None else min(g, gamma(certifying_fan_in + additions, arith.u))
    step = AffineStep(lipschitz, abs_norm, step_gamma, offset, underflow, bound.lipschitz)
    return ForwardBound(
        shape=tuple(out_shape),
        lipschitz=up(bound.lipschitz * lipschitz),
        norm=bound.norm.scale(lipschitz).shift(offset),
        error=bound.error.scale(lipschitz) + local,
        limits=bound.limits + (reach.scale(up(1.0 + g)),),
        steps=bound.steps + (step,),
    )


def exact_layer(bound: ForwardBound, out_shape) -> ForwardBound:
    """A 1-Lipschitz layer with L(0) = 0 evaluated exactly (ReLU, MinMax, max-pooling,
    reshapes): norm and error pass through."""
    return replace(bound, shape=tuple(out_shape), steps=bound.steps + (None,))


@torch._dynamo.assume_constant_result  # read while tracing, not traced
def _inductor_deviations() -> str:
    """The Inductor settings that would leave IEEE semantics in the generated code (unsafe
    math optimisations — reassociation, reciprocals — in C++, fast-math in Triton), if any."""
    from torch._inductor import config

    return ", ".join(name for name, bad in (
        ("TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG (torch._inductor.config.cpp.enable_unsafe_math_opt_flag)",
         config.cpp.enable_unsafe_math_opt_flag),
        ("TORCHINDUCTOR_USE_FAST_MATH (torch._inductor.config.use_fast_math)", config.use_fast_math),
    ) if bad)


def _check_inductor_arithmetic() -> None:
    changed = _inductor_deviations()
    if changed:
        raise RuntimeError(
            f"sound certification compiled with torch.compile needs Inductor's IEEE arithmetic; turn off {changed}"
        )


@contextlib.contextmanager
def ieee_arithmetic(device_type: str):
    """Run the block in the model's own dtype with IEEE arithmetic: autocast off and, for
    float32 matrix products and convolutions, no TF32 / reduced-precision internal formats
    (the flags are global in torch: they are restored on exit, but another thread running
    at the same time sees them too).

    Under torch.compile the flags cannot be changed inside the graph: on CUDA they must
    already be off (checked: a RuntimeError says so), and torch's float32 matmul precision
    must be its default, "highest" (see docs/soundness.md)."""
    if torch.compiler.is_compiling():
        _check_inductor_arithmetic()
        if device_type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
            raise RuntimeError(
                "certification compiled with torch.compile on CUDA needs IEEE float32: set "
                "torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False"
            )
        if device_type in ("cpu", "cuda"):
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        else:
            yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    # only what the device reads (the TF32 flags are CUDA's; the float32 matmul precision
    # also selects oneDNN's reduced-precision modes on the CPU); in the usual case (torch's
    # defaults, no autocast) nothing is set or entered, which keeps this off certify's
    # per-call cost
    change = saved[2] != "highest" or (device_type == "cuda" and (saved[0] or saved[1]))
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    try:
        if change:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        if autocast:
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        else:
            yield
    finally:
        if change:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
            torch.set_float32_matmul_precision(saved[2])


def activation_norm_upper(h: torch.Tensor) -> torch.Tensor:
    """‖h_b‖₂ per sample (B,), float64, rounded up: the certifying pass's activation norms.

    Two levels, so that most of the work runs in h's own precision (float32 for float32,
    float16 and bfloat16 h; float64 for float64 h — a float64 reduction of float32 data is
    several times slower): r̃_c = fl(‖x_c‖) over each row x_c of the view (B, G, m) (the
    channels of an image activation; G = 1 for a vector), then R̃ = fl(‖r̃‖) in float64.
    Each level is a square root of a sum of squares, summed in any order (torch's kernels,
    ONNX Runtime's). For m terms in a format with unit roundoff u and smallest subnormal η:
    fl(x²) ≥ x²(1 − u) − η, each addition of non-negative terms loses at most a factor
    1 − u, the square root one more, so ‖x‖² ≤ r̃²/(1 − u)^{m+2} + mη/(1 − u) and

        ‖x‖ ≤ r̃ (1 + γ_{m+2}) + √(2mη).

    Applied to both levels and combined by Minkowski's inequality over c:
    ‖h_b‖ ≤ (1 + γ_{m+2}(u))(1 + γ_{G+2}(u₆₄)) R̃ + √(2Gmη) + 2√(2Gη₆₄). A square that
    overflows gives +inf, and nothing is certified then.

    The rows are read where they lie (:func:`norm_rows`): the channels of an NCHW image, its
    memory in rows of max(C, H·W) entries when it is channels_last, with constants valid
    for both (:func:`sample_norm_constants`).
    """
    total, factor, offset = measured_norm(h)
    return up_tensor(up_tensor_inner(total * factor) + offset)


class MeasuredNorm(NamedTuple):
    """A per-sample norm bound not finished yet: R̃ (B,) float64, the computed two-level norm
    of :func:`activation_norm_upper`, with its ``factor`` and ``offset``; the bound is
    up(up'(R̃·factor) + offset). The certifying pass finishes all of them at once with its
    other norms (:func:`gloro_fast.ops.norm_basis`), in the same operations."""

    total: torch.Tensor
    factor: float
    offset: float


def measured_norm(h: torch.Tensor) -> MeasuredNorm:
    """:func:`activation_norm_upper` before its roundings up: the computed norm and its
    constants."""
    flat = norm_rows(h.detach())
    factor, offset = sample_norm_constants(tuple(h.shape[1:]), h.dtype)
    parts = torch.linalg.vector_norm(flat, dim=2, dtype=norm_dtype(h.dtype))
    if parts.shape[1] == 1:  # one row: the float64 norm of one value is the value, exactly
        total = parts[:, 0].to(torch.float64)
    else:
        total = torch.linalg.vector_norm(parts, dim=1, dtype=torch.float64)
    return MeasuredNorm(total, factor, offset)


def norm_rows(h: torch.Tensor) -> torch.Tensor:
    """h (B, ...) as the view (B, G, m) whose rows the two-level norm takes, without a copy:
    a vector is one row (B, 1, d); an image activation (B, C, H, W) its C channel rows of
    H·W entries, or, when it is channels_last, its memory in G = min(C, H·W) rows of
    m = max(C, H·W) consecutive entries (the same (G, m) as one of the two channel/pixel
    groupings, whose constants sample_norm_constants covers; torch's norm of the channel
    rows of a channels_last tensor copies it first: 4.3 ms instead of 0.7 ms for (256, 32,
    32, 32) on 2 cores, and rows of C entries, pixel by pixel, take 1.2 ms where rows of
    1024 take 0.8). Other shapes: rows of the first dimension."""
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        channels, pixels = h.shape[1], h.shape[2] * h.shape[3]
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], min(channels, pixels), max(channels, pixels))
    return h.flatten(2) if h.dim() > 2 else h.unsqueeze(1)


def sample_norm_constants(sample_shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[float, float]:
    """(factor, offset) of :func:`activation_norm_upper` for activations whose samples have
    shape ``sample_shape``, valid for every view :func:`norm_rows` takes of them: for an
    image (C, H, W) the larger of the constants of (G, m) = (C, H·W) and (H·W, C), so that
    one frozen model holds them whatever layout its input arrives in."""
    sample_shape = tuple(_concrete(n) for n in sample_shape)
    if len(sample_shape) == 3:
        channels, pixels = sample_shape[0], sample_shape[1] * sample_shape[2]
        a = activation_norm_constants((channels, pixels), dtype)
        b = activation_norm_constants((pixels, channels), dtype)
        return max(a[0], b[0]), max(a[1], b[1])
    if len(sample_shape) >= 2:
        return activation_norm_constants((sample_shape[0], math.prod(sample_shape[1:])), dtype)
    return activation_norm_constants((1, sample_shape[0]), dtype)


def norm_upper_from_sumsq(sumsq: torch.Tensor, terms: int) -> torch.Tensor:
    """‖h_b‖₂ per sample (B,), float64, rounded up, from S̃_b: the float64 sum of the squares
    of h_b's ``terms`` entries, squared and summed in float64 in any order (the fused MinMax
    kernel, :func:`gloro_fast.ops.minmax_norm`). Each square rounds at most by a factor
    1 ± u₆₄ and loses at most η₆₄ to underflow (float32 and narrower squares are exact), each
    addition of non-negative terms one more factor, the square root one more: the bound of
    :func:`activation_norm_upper` with one row of ``terms`` entries in float64 holds,
    ‖h_b‖ ≤ (1 + γ_{m+2}(u₆₄))(1 + γ₃(u₆₄))·fl(√S̃_b) + √(2mη₆₄) + 2√(2η₆₄)."""
    return norm_uppers([SumOfSquares(sumsq, int(terms))])[0]


class SumOfSquares(NamedTuple):
    """A per-sample norm bound not taken yet: S̃ (B,) float64, the sum of the squares of
    each sample's ``terms`` entries as :func:`norm_upper_from_sumsq` takes it. The fused
    MinMax hands this on, and the certifying pass takes all of them at once, with its other
    norms, in one op (:func:`gloro_fast.ops.norm_basis`, whose reference is
    :func:`norm_uppers` then a stack): one pass instead of a chain of small float64 ops per
    layer (each costs a dispatch, and MKL's square root of a few thousand values wakes its
    thread team, ~60 µs on 2 cores when the OpenMP workers sleep)."""

    sumsq: torch.Tensor
    terms: int


NormBound = Union[torch.Tensor, SumOfSquares, MeasuredNorm]


# what a row of :func:`norm_terms` holds (the kinds of :func:`gloro_fast.ops.norm_basis`)
BOUND, SUM_OF_SQUARES, MEASURED = 0, 1, 2


def norm_terms(bounds: Sequence[NormBound]) -> Tuple[List[torch.Tensor], List[float], List[float], List[int]]:
    """``(rows, factors, offsets, kinds)`` of the recorded bounds: a tensor as it is
    (:data:`BOUND`), a :class:`SumOfSquares` with the constants of
    :func:`norm_upper_from_sumsq` (:data:`SUM_OF_SQUARES`), a :class:`MeasuredNorm` with its
    own (:data:`MEASURED`): what :func:`finish_norms` and ``gloro_fast.ops.norm_basis`` take."""
    rows, factors, offsets, kinds = [], [], [], []
    for bound in bounds:
        if isinstance(bound, SumOfSquares):
            factor, offset = activation_norm_constants((1, bound.terms), torch.float64)
            row, kind = bound.sumsq, SUM_OF_SQUARES
        elif isinstance(bound, MeasuredNorm):
            row, factor, offset, kind = bound.total, bound.factor, bound.offset, MEASURED
        else:
            row, factor, offset, kind = bound, 0.0, 0.0, BOUND
        rows.append(row)
        factors.append(factor)
        offsets.append(offset)
        kinds.append(kind)
    return rows, factors, offsets, kinds


def finish_norms(rows: Sequence[torch.Tensor], factors: Sequence[float], offsets: Sequence[float],
                 kinds: Sequence[int]) -> List[torch.Tensor]:
    """Each row of :func:`norm_terms` as a (B,) float64 bound: a bound as it is, a measured
    norm finished as :func:`activation_norm_upper` finishes it, the sums of squares through
    :func:`norm_upper_from_sumsq`'s arithmetic all in one batch (elementwise, so each value
    is bit for bit the one-at-a-time result). The reference of ``gloro_fast.ops.norm_basis``."""
    out = [up_tensor(up_tensor_inner(r * float(factors[i])) + float(offsets[i])) if kinds[i] == MEASURED else r
           for i, r in enumerate(rows)]
    pending = [i for i, kind in enumerate(kinds) if kind == SUM_OF_SQUARES]
    if not pending:
        return out
    sums = torch.stack([rows[i] for i in pending])
    factor, offset = _sum_constants(tuple(float(factors[i]) for i in pending),
                                    tuple(float(offsets[i]) for i in pending), sums.device)
    taken = up_tensor(up_tensor_inner(torch.sqrt(sums) * factor) + offset)
    for row, i in enumerate(pending):
        out[i] = taken[row]
    return out


def norm_uppers(bounds: Sequence[NormBound]) -> List[torch.Tensor]:
    """Each bound as a (B,) float64 tensor ≥ the samples' l2 norms (:func:`finish_norms` of
    :func:`norm_terms`)."""
    return finish_norms(*norm_terms(bounds))


# (factors, offsets, device) -> the (k, 1) float64 tensors of finish_norms: made once per
# model and device, so that a call on an accelerator copies nothing from the host (a
# blocking copy would synchronise); a trace makes them afresh (graph constants)
_SUM_CONSTANTS: dict = {}


def _sum_constants(factors: Tuple[float, ...], offsets: Tuple[float, ...],
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    def make():
        return (torch.tensor(factors, dtype=torch.float64, device=device).view(-1, 1),
                torch.tensor(offsets, dtype=torch.float64, device=device).view(-1, 1))
    return memoised(_SUM_CONSTANTS, (factors, offsets, device), make)


def memoised(table: dict, key, make):
    """``make()``, kept in ``table`` under ``key`` outside traces (a trace computes it afresh:
    no state is mutated while compiling)."""
    if torch.compiler.is_compiling():
        return make()
    if key not in table:
        table[key] = make()
    return table[key]


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision :func:`activation_norm_upper` takes per-channel norms in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# (shape, dtype) -> (factor, offset): every certify call asks for the same few (about fifty
# Python roundings each); a trace computes them afresh (no state mutated while compiling)
_NORM_CONSTANTS: dict = {}


def _concrete(n) -> int:
    """A size as a Python int. Under torch.compile a size can be symbolic (Dynamo makes the
    dimensions dynamic that change between two compilations of one function), and the
    constants below need its value: ``len(range(n))`` makes Dynamo specialise the graph on it
    (a guard; another size compiles again), where ``int(n)`` stays symbolic."""
    return len(range(n)) if torch.compiler.is_compiling() else int(n)


def activation_norm_constants(shape: Tuple[int, int], dtype: torch.dtype) -> Tuple[float, float]:
    """(factor, offset) of :func:`activation_norm_upper` for activations of ``dtype`` viewed
    as (B, G, m) with ``shape`` = (G, m): ‖h_b‖ ≤ factor·R̃ + offset (before its roundings up)."""
    groups, terms = _concrete(shape[0]), _concrete(shape[1])

    def make():
        work = norm_dtype(dtype)
        u, eta = unit_roundoff(work), underflow_unit(work)
        factor = up(up(1.0 + gamma(terms + 2, u)) * up(1.0 + gamma(groups + 2, U64)))
        offset = up(up(math.sqrt(up(2.0 * groups * terms * eta)))
                    + up(2.0 * up(math.sqrt(up(2.0 * groups * underflow_unit(torch.float64))))))
        return factor, offset
    return memoised(_NORM_CONSTANTS, (groups, terms, dtype), make)
