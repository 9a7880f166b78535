"""Provable upper bounds of the operator norm of a zero-padded 2-d convolution.

The operator A maps x ∈ R^{c_in×H×W} to y[o, i, j] = Σ_{c,a,b} K[o,c,a,b]·x[c, s_h·i +
d_h·a − t, s_w·j + d_w·b − l] (zero outside the input), i < H_o, j < W_o; with
``residual`` the operator is I + A (a LiResNet block). Two provable bounds are computed
and the smaller is returned; both are functions of the kernel alone.

**Circular embedding.** Write every input index as s·Q + φ (phase φ ∈ [0, s)). Tap a
reads phase φ_a at offset q_a = ⌊(d·a − t)/s⌋, so A is a *stride-1* convolution over the
s_h·s_w phase channels (space-to-depth: an isometric relabelling of x, no looseness)
with kernel K′ supported on offsets q ∈ [q_min, q_max]. On a periodic grid of N ≥
max(H_p − q_min, H_o + q_max) (H_p = ⌈H/s⌉) no output reads a wrapped-around input, so
A = P·C_N·E with E an isometric embedding, P a coordinate restriction and C_N the
circular convolution, whence ‖A‖ ≤ ‖C_N‖ = max_ω ‖K̂′(ω)‖₂ over the N_h×N_w
frequencies (C_N is block-diagonalised by the unitary DFT); K̂′(ω) = Σ_q K′_q e^{2πi⟨q,ω/N⟩}
(+ I for the residual block). Real kernels give K̂′(−ω) = conj K̂′(ω): half the
frequencies suffice. Each K̂′(ω) = X + iY is realified as R = [[X, −Y], [Y, X]] (same
singular values), and ‖R‖₂² is bounded by the Cholesky certificate of
:mod:`gloro_fast.sound.psd`, all frequencies at once.
*Rounding.* Twiddles come from exact integer phases m = ⟨q, ω·N/N⟩ mod N_hN_w: the angle
2πm/(N_hN_w) has three roundings (≤ 20u₆₄ absolute) and cos/sin add ≤ 2u₆₄, so each twiddle
is within 64u₆₄ (margin included). Each entry of X, Y is a sum of T′ products, so
|R̃ − R| ≤ (γ_{T′+1}(1 + 64u₆₄) + 64u₆₄)·[[S, S], [S, S]] entrywise with S = Σ_q |K′_q| (+ I),
and ‖R̃ − R‖₂ ≤ 2(…)‖S‖_F. The Gram R̃ᵀR̃ adds γ_{rows}‖R̃‖_F².
Tight on large maps (measured ≤ 1.7 % on 7×7 outputs, ≤ 0.2 % on 32×32 ones).

**Explicit Gram** (operators whose smaller side has at most ``explicit_limit``
coordinates). A is a block matrix over (output pixel p, input pixel q) with block K_a
when q is the pixel tap a of p reads (plus I on the diagonal for the residual block).
The Gram of the smaller side, AAᵀ (blocks Σ K_aK_{a′}ᵀ over tap pairs reading a common
pixel) or AᵀA (blocks Σ K_aᵀK_{a′} over tap pairs of a common output pixel), is built
exactly in structure from the tap-pair products; each entry is a sum of at most
c·T + T² products, so ‖M̃ − M‖₂ ≤ γ_{c·T+T²}‖A‖_F². Its λ_max is certified as above:
this is the exact norm up to ~10⁻⁸ (the certificate's slack).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .dense import power_of_two_scale, schur_upper, spectral_norm_upper
from .psd import lambda_max_estimate, lambda_max_upper
from .rounding import ETA64, U64, gamma, up

__all__ = ["ConvGeometry", "conv_geometry", "conv_norm_upper", "conv_abs_norm_upper",
           "conv_circular_upper", "conv_explicit_upper", "EXPLICIT_LIMIT"]

EXPLICIT_LIMIT = 4096      # coordinates on the Gram's side; its Cholesky takes ~0.5 s on 2 cores
_TIGHT_ENOUGH = 2e-4       # circular bounds this close to a power-iteration lower bound are kept
_FREQ_CHUNK = 256
_TWIDDLE_ERR = 64 * U64


class ConvGeometry(NamedTuple):
    c_in: int
    height: int
    width: int
    c_out: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    pads: Tuple[int, int, int, int]  # top, bottom, left, right
    groups: int
    residual: bool
    out_height: int
    out_width: int

    @property
    def inputs(self) -> int:
        return self.c_in * self.height * self.width

    @property
    def outputs(self) -> int:
        return self.c_out * self.out_height * self.out_width


def conv_geometry(weight_shape, input_shape, stride, pads, dilation, groups, residual=False) -> ConvGeometry:
    """Validated geometry of a convolution with kernel ``weight_shape`` (c_out, c_in/g, kh,
    kw) on inputs (c_in, H, W)."""
    c_out, c_in_g, kh, kw = (int(s) for s in weight_shape)
    c_in, height, width = (int(s) for s in input_shape)
    if groups < 1 or c_in != c_in_g * groups or c_out % groups:
        raise ValueError(
            f"input channels {c_in} and kernel {tuple(weight_shape)} do not match groups={groups}"
        )
    top, bottom, left, right = pads
    oh = (height + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {tuple(weight_shape)} does not fit the padded input {tuple(input_shape)}")
    if residual and (c_out != c_in or (oh, ow) != (height, width)):
        raise ValueError("residual=True needs an output shape equal to the input shape")
    return ConvGeometry(c_in, height, width, c_out, (kh, kw), tuple(stride), tuple(dilation),
                        tuple(pads), groups, bool(residual), oh, ow)


# ---------------------------------------------------------------------- circular bound
def _axis_phases(k: int, s: int, d: int, pad: int):
    offsets = [d * a - pad for a in range(k)]
    q = [o // s for o in offsets]          # floor division: exact for ints
    phase = [o - s * qq for o, qq in zip(offsets, q)]
    return q, phase


def _phase_kernel(w: torch.Tensor, g: ConvGeometry):
    """K′ (groups, c_out/g, c_in/g·s_h·s_w, n_qh, n_qw) and the offset ranges."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    qh, ph = _axis_phases(kh, sh, dh, g.pads[0])
    qw, pw = _axis_phases(kw, sw, dw, g.pads[2])
    qh0, qw0 = min(qh), min(qw)
    nqh, nqw = max(qh) - qh0 + 1, max(qw) - qw0 + 1
    co_g, ci_g = g.c_out // g.groups, g.c_in // g.groups
    k = w.reshape(g.groups, co_g, ci_g, kh, kw)
    out = torch.zeros(g.groups, co_g, ci_g, sh, sw, nqh, nqw, dtype=w.dtype)
    for a in range(kh):
        for b in range(kw):
            # each tap lands on its own (phase, offset) slot: a copy, no arithmetic
            out[:, :, :, ph[a], pw[b], qh[a] - qh0, qw[b] - qw0] = k[:, :, :, a, b]
    return out.reshape(g.groups, co_g, ci_g * sh * sw, nqh, nqw), (qh0, max(qh)), (qw0, max(qw))


def _grid(length_in: int, s: int, out: int, qrange) -> int:
    hp = -(-length_in // s)
    return max(hp - qrange[0], out + qrange[1], hp, out)


def conv_circular_upper(weight: torch.Tensor, g: ConvGeometry, identity: float = 1.0) -> float:
    """The circular-embedding bound (module docstring); ``weight`` float64 on the CPU. With
    ``g.residual`` the operator is ``identity``·I + A (a power of two keeps it exact)."""
    kp, (qh0, qh1), (qw0, qw1) = _phase_kernel(weight, g)
    groups, co_g, ci_p, nqh, nqw = kp.shape
    n_h = _grid(g.height, g.stride[0], g.out_height, (qh0, qh1))
    n_w = _grid(g.width, g.stride[1], g.out_width, (qw0, qw1))
    taps = nqh * nqw
    # integer phases of every (frequency, tap): exact
    fh = torch.arange(n_h, dtype=torch.int64)
    fw = torch.arange(n_w // 2 + 1, dtype=torch.int64)
    oh = torch.arange(qh0, qh1 + 1, dtype=torch.int64)
    ow = torch.arange(qw0, qw1 + 1, dtype=torch.int64)
    period = n_h * n_w
    phase = (fh.view(-1, 1, 1, 1) * oh.view(1, 1, -1, 1) * n_w
             + fw.view(1, -1, 1, 1) * ow.view(1, 1, 1, -1) * n_h) % period
    angle = phase.reshape(-1, taps).to(torch.float64) * (2.0 * math.pi / period)
    cos, sin = torch.cos(angle), torch.sin(angle)
    flat = kp.permute(3, 4, 0, 1, 2).reshape(taps, groups * co_g * ci_p)
    # entrywise error of the computed symbol (and of R), independent of the frequency
    s_abs = kp.abs().sum(dim=(3, 4))  # (groups, co_g, ci_p)
    if g.residual:
        s_abs = s_abs + identity * torch.eye(co_g, ci_p, dtype=torch.float64)
    coef = up(gamma(taps + 1, U64) * (1.0 + _TWIDDLE_ERR) + _TWIDDLE_ERR)
    s_fro = float(torch.linalg.vector_norm(s_abs.reshape(groups, -1), dim=1).amax())
    sym_err = up(2.0 * coef * up(s_fro * (1.0 + gamma(s_abs[0].numel(), U64))))
    rows, cols = 2 * co_g, 2 * ci_p
    side = min(rows, cols)
    eye = identity * torch.eye(co_g, ci_p, dtype=torch.float64) if g.residual else None
    lam = 0.0
    for start in range(0, cos.shape[0], _FREQ_CHUNK):
        c, s = cos[start:start + _FREQ_CHUNK], sin[start:start + _FREQ_CHUNK]
        x = (c @ flat).reshape(-1, groups, co_g, ci_p)
        y = (s @ flat).reshape(-1, groups, co_g, ci_p)
        if eye is not None:
            x = x + eye
        r = torch.cat([torch.cat([x, -y], dim=3), torch.cat([y, x], dim=3)], dim=2)
        r = r.reshape(-1, rows, cols)
        gram = r.mT @ r if cols <= rows else r @ r.mT
        fro2 = (r * r).sum(dim=(1, 2))
        inner = rows if cols <= rows else cols
        err = up(gamma(inner, U64) * up(float(fro2.amax()) * (1.0 + gamma(rows * cols, U64))))
        err = up(err + side * inner * ETA64)
        lam = max(lam, lambda_max_upper(gram, err))
        if not math.isfinite(lam):
            return math.inf
    return up(up(math.sqrt(lam)) + sym_err)


# ---------------------------------------------------------------------- explicit Gram
def _taps_of_outputs(g: ConvGeometry):
    """(output pixel, tap, input pixel) for every tap that reads inside the input."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    i = torch.arange(g.out_height).view(-1, 1, 1, 1)
    j = torch.arange(g.out_width).view(1, -1, 1, 1)
    a = torch.arange(kh).view(1, 1, -1, 1)
    b = torch.arange(kw).view(1, 1, 1, -1)
    r = sh * i + dh * a - g.pads[0]
    c = sw * j + dw * b - g.pads[2]
    shape = (g.out_height, g.out_width, kh, kw)
    r, c = r.expand(shape), c.expand(shape)
    out_pix = (i * g.out_width + j).expand(shape)
    tap = (a * kw + b).expand(shape)
    valid = (r >= 0) & (r < g.height) & (c >= 0) & (c < g.width)
    in_pix = r * g.width + c
    out_pix, tap, in_pix = out_pix[valid], tap[valid], in_pix[valid]
    if g.residual:  # I as one more "tap" reading the same pixel
        n = g.height * g.width
        ident = torch.arange(n)
        out_pix = torch.cat([out_pix, ident])
        in_pix = torch.cat([in_pix, ident])
        tap = torch.cat([tap, torch.full((n,), kh * kw, dtype=tap.dtype)])
    return out_pix, tap, in_pix


def _pairs_sharing(key: torch.Tensor, other: torch.Tensor, tap: torch.Tensor, taps: int):
    """All pairs of entries with equal ``key``: returns (other₁, other₂, tap₁, tap₂)."""
    order = torch.argsort(key, stable=True)
    key, other, tap = key[order], other[order], tap[order]
    _, counts = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel()) - torch.repeat_interleave(starts, counts)
    width = int(counts.max())
    group_id = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    table = torch.full((counts.numel(), width), -1, dtype=torch.int64)
    table[group_id, rank] = torch.arange(key.numel())
    first = table.unsqueeze(2).expand(-1, width, width)
    second = table.unsqueeze(1).expand(-1, width, width)
    keep = (first >= 0) & (second >= 0)
    first, second = first[keep], second[keep]
    return other[first], other[second], tap[first], tap[second]


def conv_explicit_upper(weight: torch.Tensor, g: ConvGeometry, circular: float = math.inf,
                        identity: float = 1.0) -> float:
    """The explicit-Gram bound (module docstring); ``weight`` float64 on the CPU (with
    ``g.residual``: ``identity``·I + A). Skips the certificate (returns ``circular``) when the
    Gram's Lanczos estimate already reaches ``circular``², i.e. when the circular bound is
    tight."""
    kh, kw = g.kernel
    taps = kh * kw + (1 if g.residual else 0)
    co_g, ci_g = g.c_out // g.groups, g.c_in // g.groups
    out_pix, tap, in_pix = _taps_of_outputs(g)
    if out_pix.numel() == 0:
        return 0.0  # every tap reads padding: A = 0
    use_outputs = g.outputs <= g.inputs
    if use_outputs:  # AAᵀ: blocks (p, p') over taps reading a common input pixel
        x1, x2, t1, t2 = _pairs_sharing(in_pix, out_pix, tap, taps)
        n_pix, c = g.out_height * g.out_width, co_g
    else:            # AᵀA: blocks (q, q') over taps of a common output pixel
        x1, x2, t1, t2 = _pairs_sharing(out_pix, in_pix, tap, taps)
        n_pix, c = g.height * g.width, ci_g
    block_id = x1 * n_pix + x2
    rows, row_of = torch.unique(block_id, return_inverse=True)
    count = torch.zeros(rows.numel(), taps * taps, dtype=torch.float64)
    count.index_put_((row_of, t1 * taps + t2), torch.ones_like(row_of, dtype=torch.float64), accumulate=True)
    k = weight.reshape(g.groups, co_g, ci_g, kh * kw)
    best = 0.0
    n_valid = float(torch.bincount(tap, minlength=taps)[: kh * kw].sum())
    for grp in range(g.groups):
        kg = k[grp].permute(2, 0, 1)  # (T, co_g, ci_g)
        if g.residual:
            kg = torch.cat([kg, identity * torch.eye(co_g, ci_g, dtype=torch.float64).unsqueeze(0)])
        if use_outputs:
            prod = torch.einsum("aoc,bpc->abop", kg, kg)
        else:
            prod = torch.einsum("aoc,bod->abcd", kg, kg)
        blocks = (count @ prod.reshape(taps * taps, c * c)).reshape(-1, c, c)
        gram = torch.zeros(n_pix, c, n_pix, c, dtype=torch.float64)
        gram.permute(0, 2, 1, 3)[rows // n_pix, rows % n_pix] = blocks
        gram = gram.reshape(n_pix * c, n_pix * c)
        # pixel-major order: blocks (p, p′) vanish beyond the largest |p − p′| that occurs
        band = (int((rows // n_pix - rows % n_pix).abs().max()) + 1) * c
        # ‖A‖_F² ≤ (Σ over reading taps of ‖K_a‖_F² )… counted per output pixel, + √n for I
        kfro2 = float((kg[: kh * kw] ** 2).sum(dim=(1, 2)).amax()) * n_valid
        fro = up(math.sqrt(up(kfro2 * (1.0 + gamma(kg.numel() + 1, U64)))))
        if g.residual:
            fro = up(fro + identity * math.sqrt(g.inputs))
        inner = (ci_g if use_outputs else co_g) * taps + taps * taps
        err = up(up(gamma(inner, U64) * up(fro * fro)) + inner * gram.shape[0] * ETA64)
        if not bool(torch.isfinite(gram.diagonal()).all()):
            return math.inf  # a Gram's diagonal dominates: any overflow shows there
        estimate = lambda_max_estimate(gram, band=band)
        if math.isfinite(circular) and float(estimate[0]) >= circular * circular * (1.0 - 1e-12):
            best = max(best, circular)
            continue
        best = max(best, up(math.sqrt(lambda_max_upper(gram, err, estimate, band=band))))
    return best


def _power_lower(weight: torch.Tensor, g: ConvGeometry, identity: float, steps: int = 60) -> float:
    """About ‖A‖ (or ‖identity·I + A‖) from below: a short float32 power iteration from a
    fixed start (deterministic). It only decides whether the explicit bound is worth
    computing, so its own rounding (≪ the 2·10⁻⁴ it is compared at) does not matter."""
    from ..ops.power_iteration_conv import conv_operator, conv_operator_adjoint

    gen = torch.Generator(device="cpu").manual_seed(0x51)
    # float32: a heuristic needs no float64, and float64 convolutions are slow on CPU
    weight = weight.to(torch.float32)
    u = torch.randn((1, g.c_in, g.height, g.width), generator=gen, dtype=torch.float32)
    args = (g.stride, g.pads, g.dilation, g.groups)

    def apply(x):
        out = conv_operator(x, weight, *args)
        return out + identity * x if g.residual else out

    sigma = 0.0
    for _ in range(steps):
        u = u / torch.linalg.vector_norm(u)
        v = apply(u)
        sigma = float(torch.linalg.vector_norm(v))
        if sigma == 0.0 or not math.isfinite(sigma):
            return 0.0
        back = conv_operator_adjoint(v, weight, *args, (g.height, g.width))
        u = back + identity * v if g.residual else back
    return sigma


# ---------------------------------------------------------------------- public entries
def conv_norm_upper(weight: torch.Tensor, input_shape: Sequence[int], stride, pads, dilation,
                    groups: int = 1, residual: bool = False,
                    explicit_limit: Optional[int] = EXPLICIT_LIMIT) -> float:
    """Provable upper bound of ‖A‖₂ (or ‖I + A‖₂ with ``residual``) for the zero-padded
    convolution of :mod:`this module <gloro_fast.sound.conv>`: the smaller of the circular
    bound and, when the Gram's side has ≤ ``explicit_limit`` coordinates, the explicit one.
    ``weight`` any float dtype/device; +inf if it holds a non-finite value."""
    g = conv_geometry(weight.shape, input_shape, stride, pads, dilation, groups, residual)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        return math.inf
    # scale by a power of two (exact): ‖A‖ = 2ᵉ‖2⁻ᵉA‖ and ‖I + A‖ = 2ᵉ‖2⁻ᵉI + 2⁻ᵉA‖
    w, e = power_of_two_scale(w)
    if not residual and float(w.abs().max()) == 0.0:
        return 0.0
    if residual and e < 0:  # small kernels: I dominates, keep it at 1
        w, e = torch.ldexp(w, torch.tensor(e, dtype=torch.float64)), 0
    identity = math.ldexp(1.0, -e)
    bound = conv_circular_upper(w, g, identity)
    if (explicit_limit is not None and min(g.inputs, g.outputs) <= explicit_limit
            and bound > _power_lower(w, g, identity) * (1.0 + _TIGHT_ENOUGH)):
        bound = min(bound, conv_explicit_upper(w, g, bound, identity))
    # the scaled kernel may have lost subnormal bits: ≤ 2⁻¹⁰⁷⁵ per entry, ≤ √(nnz)·2⁻¹⁰⁷⁴ in norm
    underflow = math.sqrt(g.outputs * (g.c_in // g.groups) * g.kernel[0] * g.kernel[1]) * ETA64
    return up(math.ldexp(up(bound + underflow), e))


def conv_abs_norm_upper(weight: torch.Tensor, input_shape: Sequence[int], stride, pads, dilation,
                        groups: int = 1, residual: bool = False) -> float:
    """Provable upper bound of ‖|A|‖₂ (|A| the entrywise absolute operator; ‖|I + A|‖₂ ≤
    1 + ‖|A|‖₂ with ``residual``): |A| is the zero-padded convolution with |K|, whose circular
    symbol is largest at ω = 0 (|K̂′(ω)| ≤ S = Σ_q |K′_q| entrywise, and the norm of a
    non-negative matrix grows with its entries), so ‖|A|‖₂ ≤ ‖S‖₂ (certified per group)."""
    g = conv_geometry(weight.shape, input_shape, stride, pads, dilation, groups, residual)
    w = weight.detach().to(device="cpu", dtype=torch.float64).abs()
    if not bool(torch.isfinite(w).all()):
        return math.inf
    kp, _, _ = _phase_kernel(w, g)  # copies only: exact
    s = kp.sum(dim=(3, 4))          # (groups, co_g, ci_p), non-negative, T′ terms each
    taps = kp.shape[3] * kp.shape[4]
    # the computed S is at most γ_T′·S above or below the exact one: scale it up
    s = s * up(1.0 + gamma(taps, U64))
    bound = max(min(spectral_norm_upper(sg), schur_upper(sg)) for sg in s)
    bound = up(bound * up(1.0 + 2.0 ** -50))
    return up(bound + 1.0) if residual else bound
