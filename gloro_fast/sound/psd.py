"""A provable upper bound of the largest eigenvalue of symmetric matrices.

Given a computed symmetric matrix M (float64; only its lower triangle is read) and a
bound ``error`` ≥ ‖M − M★‖₂ on its distance to the exact matrix M★, returns
λ ≥ max λ(M★), proved as follows.

*Certificate.* Pick τ ≈ λ_max(M) from above and run the floating-point Cholesky
factorisation of B̃ = fl(τI − M). If it completes, the computed factor R̃ satisfies
R̃ᵀR̃ = B̃ + ΔB with |ΔB_ij| ≤ γ_{n+1}/(1 − γ_{n+1}) · √(b̃_ii b̃_jj) (Higham, Thm 10.3,
with ‖r_i‖² ≤ b̃_ii/(1 − γ_{n+1})), so ‖ΔB‖₂ ≤ c·trace(B̃) and B̃ ⪰ −c·trace(B̃)·I.
The diagonal of B̃ carries one rounding, |b̃_ii − (τ − m_ii)| ≤ u|τ − m_ii|. Hence

    λ_max(M★) ≤ τ + c·trace(B̃) + u·max_i |τ − m_ii| + error.

We use c = γ_{2(n+1)}/(1 − γ_{2(n+1)}), twice the textbook constant, as a margin for
blocked LAPACK variants. The relative slack is about 2n²u₆₄ (4·10⁻⁹ at n = 4096).

*Choosing τ.* A Lanczos estimate λ̂ ≤ λ_max (full re-orthogonalisation, a fixed start
vector, so the result depends on M only), then τ = λ̂(1 + δ) for δ growing tenfold
from about 10⁻⁸ until the factorisation completes. The Gershgorin bound max_i Σ_j|m_ij|
(always valid) caps the search and is returned if no τ below it is certified.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch

from .._mkl import mkl_function
from .rounding import U64, gamma, up

__all__ = ["lambda_max_upper", "lambda_max_estimate"]

_EIGVALSH_MAX = 128     # up to this size the batched symmetric eigensolver is the cheapest guess
_LANCZOS_STEPS = 400
_CHECKPOINTS = (40, 80, 160, 320)  # convergence checks (each solves the tridiagonal problem)


@contextlib.contextmanager
def _one_thread():
    """Small LAPACK eigenproblems on one thread: on a busy machine, a thread pool makes a
    400×400 eigh a hundred times slower (its threads wait for each other). MKL's limit for
    the calling thread where torch has MKL (``torch.set_num_threads`` would leave MKL's
    dynamic threading off for the whole process: every later ``torch.sqrt`` then wakes its
    thread team, see :mod:`gloro_fast._mkl`), else torch's intra-op thread count."""
    local = mkl_function("MKL_Set_Num_Threads_Local")
    if local is not None:
        before = local(1)
        try:
            yield
        finally:
            local(before)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ritz_top(alpha, beta, k):
    tri = (torch.diag_embed(alpha[:, :k]) + torch.diag_embed(beta[:, : k - 1], 1)
           + torch.diag_embed(beta[:, : k - 1], -1))
    with _one_thread():
        values, vectors = torch.linalg.eigh(tri)
    return values[:, -1], (beta[:, k - 1] * vectors[:, -1, -1]).abs()


def lambda_max_estimate(m: torch.Tensor, max_steps: int = _LANCZOS_STEPS, rtol: float = 1e-4,
                        band: Optional[int] = None):
    """Estimate of λ_max of each symmetric matrix in ``m`` (..., n, n), float64.

    Returns ``(theta, residual)``: the top Ritz value (from below in exact arithmetic)
    and its residual norm ‖Mz − θz‖ (some eigenvalue lies within it of θ). Up to
    ``_EIGVALSH_MAX`` the symmetric eigensolver (residual 0); above it Lanczos with full
    re-orthogonalisation from a fixed start vector (so the result depends on M only),
    until residual ≤ rtol·θ or ``max_steps`` (the Ritz value's error is of the order of
    residual²/gap, far below the residual). A single matrix with a narrow ``band``
    (entries ≥ band off the diagonal are zero) is multiplied one band of rows at a time.
    """
    batch_shape, n = m.shape[:-2], m.shape[-1]
    a = m.reshape(-1, n, n)
    if n <= _EIGVALSH_MAX:
        with _one_thread():
            theta = torch.linalg.eigvalsh(a)[:, -1].reshape(batch_shape)
        return theta, torch.zeros_like(theta)
    b = a.shape[0]
    # the estimate only guides τ, to ~1e-6 at best: float32 matrix-vector products halve the
    # memory traffic of these memory-bound steps
    a = a.to(torch.float32)
    if b == 1 and band is not None and 4 * band < n:
        dense = a[0]
        spans = [(r, min(r + band, n), max(0, r - band), min(n, r + 2 * band)) for r in range(0, n, band)]

        def apply(v):
            out = torch.empty_like(v)
            for r0, r1, c0, c1 in spans:
                torch.mv(dense[r0:r1, c0:c1], v[0, c0:c1], out=out[0, r0:r1])
            return out
    else:
        def apply(v):
            return torch.bmm(a, v.unsqueeze(2)).squeeze(2)
    steps = min(max_steps, n)
    gen = torch.Generator(device="cpu").manual_seed(0x6C0)
    q = torch.randn(n, generator=gen, dtype=torch.float32).to(a.device).expand(b, n).clone()
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    basis = torch.zeros(b, steps, n, dtype=torch.float32, device=a.device)
    alpha = torch.zeros(b, steps, dtype=torch.float64, device=a.device)
    beta = torch.zeros(b, steps, dtype=torch.float64, device=a.device)
    tiny = torch.finfo(torch.float32).tiny
    for k in range(steps):
        basis[:, k] = q
        w = apply(q)
        alpha[:, k] = (q * w).sum(1, dtype=torch.float64)
        # full re-orthogonalisation, twice ("twice is enough")
        for _ in range(2):
            w = w - torch.bmm(basis[:, : k + 1].mT, torch.bmm(basis[:, : k + 1], w.unsqueeze(2))).squeeze(2)
        norm = torch.linalg.vector_norm(w, dim=1)
        alive = norm > 1e-6 * alpha[:, : k + 1].abs().amax(1).to(torch.float32).clamp_min(tiny)
        # an invariant subspace was found: the rest of that Krylov sequence stays zero
        q = torch.where(alive.unsqueeze(1), w / norm.clamp_min(tiny).unsqueeze(1), torch.zeros_like(w))
        beta[:, k] = torch.where(alive, norm, torch.zeros_like(norm))
        if k + 1 in _CHECKPOINTS and k + 1 < steps:
            theta, residual = _ritz_top(alpha, beta, k + 1)
            if bool((residual <= rtol * theta.abs()).all()):
                return theta.reshape(batch_shape), residual.reshape(batch_shape)
    theta, residual = _ritz_top(alpha, beta, steps)
    return theta.reshape(batch_shape), residual.reshape(batch_shape)


def _gershgorin(m: torch.Tensor) -> float:
    """max_i Σ_j |s_ij| for the symmetric S defined by m's lower triangle, bounded by the
    row plus the column sum of |m| (S's row i takes each entry from one of them)."""
    n = m.shape[-1]
    a = m.abs()
    rows = (a.sum(-1) + a.sum(-2)).amax()
    return up(float(rows) * (1.0 + gamma(2 * n, U64)))


def _banded_cholesky_completes(a: torch.Tensor, band: int, block: int = 256) -> bool:
    """Blocked right-looking Cholesky of the symmetric matrix given by the lower triangle of
    ``a`` (n, n), whose entries ≥ ``band`` off the diagonal are zero, touching only the band
    (where the dense algorithm would compute exact zeros). Each entry of the factor is still
    (a_ij − Σ_k l_ik l_jk)/l_jj with the sum grouped by blocks, so the componentwise error
    bound of the certificate holds. ``a`` is overwritten."""
    n = a.shape[0]
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        factor, info = torch.linalg.cholesky_ex(a[k0:k1, k0:k1])
        if int(info) != 0:
            return False
        end = min(n, k1 + band)
        if end > k1:
            panel = torch.linalg.solve_triangular(factor, a[k1:end, k0:k1].t(), upper=False).t()
            a[k1:end, k1:end] -= panel @ panel.t()
    return True


def _certified_at(m: torch.Tensor, tau: float, band: Optional[int] = None):
    """λ_max bound certified by a Cholesky factorisation of τI − M (all batch entries), or
    None if one of them fails."""
    n = m.shape[-1]
    shifted = -m  # exact; the diagonal then carries the one rounding of τ − m_ii
    shifted.diagonal(dim1=-2, dim2=-1).add_(tau)
    diag = shifted.diagonal(dim1=-2, dim2=-1).clone()
    if band is not None and m.dim() == 2 and 2 * band < n:
        if not _banded_cholesky_completes(shifted, band):
            return None
    else:
        # LAPACK reads the lower triangle only: the matrix factorised is τI − S
        _, info = torch.linalg.cholesky_ex(shifted)
        if bool((info != 0).any()):
            return None
    if not bool((diag > 0).all()):
        return None
    g = gamma(2 * (n + 1), U64)
    if not math.isfinite(g) or g >= 1:
        return None
    c = up(g / (1.0 - g) * (1.0 + 2 * U64))
    trace = up(float(diag.sum(-1).amax()) * (1.0 + gamma(n, U64)))
    diag_err = up(U64 * up(tau + float(m.diagonal(dim1=-2, dim2=-1).abs().amax())))
    return up(up(tau + up(c * trace)) + diag_err)


def lambda_max_upper(m: torch.Tensor, error: Union[float, torch.Tensor] = 0.0, estimate=None,
                     band: Optional[int] = None) -> float:
    """Provable upper bound of max λ_max(M★) over the batch ``m`` (..., n, n), where each
    exact matrix M★ is within ``error`` (float, or a tensor broadcasting to the batch) of
    the symmetric matrix S given by the lower triangle of ``m`` in spectral norm (the
    factorisation reads only that triangle; the Lanczos estimate that guides τ may read a
    matrix that is symmetric up to rounding, e.g. a computed Gram matrix).
    ``estimate``: a precomputed :func:`lambda_max_estimate` of ``m`` (it only guides τ).
    ``band``: entries of the single matrix ``m`` at ≥ band off the diagonal are zero (a
    promise the caller's structure keeps); the factorisation then stays inside the band.

    Returns +inf when ``m`` or ``error`` holds a non-finite value (fail closed).
    """
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"m must be a (..., n, n) tensor, got {getattr(m, 'shape', type(m))}")
    err = float(torch.as_tensor(error, dtype=torch.float64).max()) if not isinstance(error, float) else error
    if not math.isfinite(err) or err < 0:
        return math.inf
    m = m.detach().to(torch.float64)
    if m.numel() == 0:
        return up(err)
    if not bool(torch.isfinite(m).all()):
        return math.inf
    cap = _gershgorin(m)
    if cap == 0.0:
        return up(err)
    theta, residual = lambda_max_estimate(m, band=band) if estimate is None else estimate
    top = int(theta.reshape(-1).argmax())
    guess = float(theta.reshape(-1)[top])
    n = m.shape[-1]
    floor_rel = max(1e-9, 8.0 * n * n * U64)
    best = cap
    base = max(guess, 0.0)
    if base == 0.0:
        base = cap * 1e-6
    # Some eigenvalue lies within the Ritz residual r of the estimate, and the top one is
    # usually much closer (≈ r²/gap): grow the shift tenfold from the rounding floor; after
    # the first success, one geometric bisection between the last failure and it.
    delta, failed = floor_rel, None
    while delta < 1.0:
        tau = up(base * (1.0 + delta))
        if tau >= best:
            break
        bound = _certified_at(m, tau, band)
        if bound is not None:
            best = min(best, bound)
            if failed is not None:
                mid = math.sqrt(failed * delta)
                bound = _certified_at(m, up(base * (1.0 + mid)), band)
                if bound is not None:
                    best = min(best, bound)
            break
        failed, delta = delta, delta * 10.0
    return up(best + err)
