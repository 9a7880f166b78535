"""The Lipschitz bounds a :class:`~gloro_fast.GloroNet` certifies with, and their cache.

Two kinds, both computed once per set of weights and cached until any parameter changes
(in place, through ``.data``, by ``load_state_dict``, ``.to()``/``.double()``):

- **estimate** (``certificate="estimate"``, the GloRo paper's): K = Π σ̂_l with each
  layer's power iteration converged (:meth:`~gloro_fast.nn.PowerIterationModule.converge`),
  and the class distances D_ji = ‖w_j − w_i‖ by direct differences in the model's dtype.
  σ̂ approaches each norm *from below*: an estimate.
- **sound** (``certificate="sound"``, the default): K = Π of the layers' provable upper
  bounds, D_ji rounded up in float64, and the a-priori rounding-error bounds of the
  forward pass (:mod:`gloro_fast.sound.forward_error`). Nothing in it comes from an
  iterate, a tolerance or an iteration count, so nothing read from a checkpoint can
  weaken it.

With Δ(r) ≥ ‖h̃(x) − h(x)‖ (body error) and ρ(r) ≥ |f̃_i(x) − fl-free head output| (head
rounding, any i), both affine in r = ‖x‖, a prediction j of the computed logits f̃ is
*soundly certified* at radius ε when, for every i ≠ j,

    f̃_j(x) − f̃_i(x) > D_ji · (εK + Δ(r) + Δ(r + ε)) + 2ρ(r) + 2ρ(r + ε)

and r + ε ≤ ``max_input_norm`` (no overflow anywhere in the ball). Then for every x′ with
‖x′ − x‖ ≤ ε both the exact network and its evaluation in the model's dtype predict j:
f_j(x′) − f_i(x′) ≥ f_j(x) − f_i(x) − εK D_ji ≥ f̃_j(x) − f̃_i(x) − D_jiΔ(r) − 2ρ(r) − εKD_ji,
and the computed f̃(x′) differs from f(x′) by at most D_jiΔ(r + ε) + 2ρ(r + ε) per pair.
The decision is made in float64 with the margin rounded down and the threshold up.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

from .nn import Linear, LipschitzModule, PowerIterationModule, Sequential
from .ops import class_distances
from .sound.dense import spectral_norm_upper
from .sound.forward_error import Affine, AffineStep, Arithmetic, ForwardBound
from .sound.rounding import U64, gamma, up, up_tensor

__all__ = ["Allowance", "BoundCache", "EstimateBounds", "LayerBracket", "SoundBounds",
           "CERTIFICATES", "check_certificate", "chain_layers", "compute_estimate", "compute_sound",
           "upper_bounds", "with_uppers"]

CERTIFICATES = ("sound", "estimate")
_SQRT2_UP = up(math.sqrt(2.0))
_BRACKET_WARN = 0.05   # a stalled power iteration whose bracket is wider than this warns


def check_certificate(certificate) -> str:
    if certificate not in CERTIFICATES:
        raise ValueError(f"certificate must be one of {CERTIFICATES}, got {certificate!r}")
    return certificate


@dataclass(frozen=True)
class LayerBracket:
    """One layer's provable bracket lower ≤ Lip ≤ upper, with the power iteration's outcome
    for power-iterated layers (``estimate``, ``iterations``, ``status``; else None)."""

    name: str
    layer: str
    lower: float
    upper: float
    estimate: Optional[float] = None
    iterations: Optional[int] = None
    status: Optional[str] = None

    @property
    def ratio(self) -> float:
        """upper / lower (1 for an exact constant; inf for a zero lower bound)."""
        if self.lower > 0:
            return self.upper / self.lower
        return 1.0 if self.upper == 0 else math.inf


@dataclass(frozen=True)
class EstimateBounds:
    lipschitz: torch.Tensor        # 0-dim, model dtype and device
    distances: torch.Tensor        # (C, C)
    brackets: Tuple[LayerBracket, ...]


@dataclass(frozen=True)
class Allowance:
    """Per-sample terms of the sound test, each affine in the radius ε (float64, (B,)):
    certified at ε iff f̃_j − f̃_i > D_ji·(s1 + ε·s1_slope) + s0 + ε·s0_slope for all i ≠ j
    and ε ≤ ``eps_max`` (beyond it the ball may overflow; −inf: x itself is not admissible)."""

    s1: torch.Tensor
    s1_slope: torch.Tensor
    s0: torch.Tensor
    s0_slope: torch.Tensor
    eps_max: torch.Tensor
    body_error: torch.Tensor       # Δ(x) ≥ ‖h̃(x) − h(x)‖ (the computed features' error)
    logit_error: torch.Tensor      # ρ(x) ≥ |f̃_i(x) − (w_iᵀh̃(x) + b_i)| (one logit's rounding)

    def refuse_unless(self, ok: torch.Tensor) -> "Allowance":
        """The same allowance, admitting nothing where ``ok`` (a bool tensor broadcasting
        to (B,)) is False."""
        return replace(self, eps_max=torch.where(ok, self.eps_max, torch.full_like(self.eps_max, -math.inf)))


@dataclass(frozen=True)
class SoundBounds:
    """Everything a sound certificate needs (see the module docstring).

    ``steps`` (one per body layer, None for exact ones) enable the per-sample bound that
    uses the computed activation norms ‖h̃_l(x)‖ of the certifying forward pass; without
    them (a body that is not a chain of layers) the a-priori bounds, affine in ‖x‖, apply.
    """

    lipschitz: float               # K ≥ Lip(body)
    distances: torch.Tensor        # (C, C) float64 on the model's device, D_ji ≥ ‖w_j − w_i‖
    steps: Optional[Tuple[Optional[AffineStep], ...]]
    body_norm: Affine              # ‖h(x)‖ ≤ body_norm(‖x‖)      (a priori)
    body_error: Affine             # ‖h̃ − h‖ ≤ body_error(‖x‖)    (a priori)
    head_gamma: float              # γ_{d+2}: one logit's rounding ≤ γ(w_max‖h̃‖ + b_max) + underflow
    head_underflow: float
    w_max: float
    b_max: float
    cap: float                     # partial sums must stay below it (half the largest finite)
    max_input_norm: float          # a priori: larger ‖x‖ may overflow
    uppers: Tuple[Tuple[str, str, float], ...]   # (name, layer type, upper) per bounded layer
    dtype: torch.dtype

    # -- the allowance -------------------------------------------------------------
    @staticmethod
    def input_norms(x: torch.Tensor) -> torch.Tensor:
        """‖x‖ per sample, float64, rounded up."""
        flat = x.detach().flatten(1)
        norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
        return up_tensor(norms * (1.0 + gamma(max(flat.shape[1], 1), U64)))

    def _head(self, feat, delta, dp, dp_slope):
        """ρ(x) and ρ(x′) = c + ε·m for the head, and its overflow limit on ε."""
        g, w, b, uf = self.head_gamma, self.w_max, self.b_max, self.head_underflow
        rho = up_tensor(g * up_tensor(w * feat + b) + uf)
        far = up_tensor(feat + delta + dp)                         # ‖h̃(x′)‖ at ε = 0
        far_slope = up_tensor(self.lipschitz + dp_slope)
        rho_far = up_tensor(g * up_tensor(w * far + b) + uf)
        rho_far_slope = up_tensor(g * w * far_slope)
        reach = up_tensor(w * feat + b) * up(1.0 + g)
        reach_far = up_tensor(w * far + b) * up(1.0 + g)
        eps_max = _eps_limit(reach, reach_far, up_tensor(w * far_slope) * up(1.0 + g), self.cap)
        return rho, rho_far, rho_far_slope, eps_max

    def allowance(self, x: torch.Tensor, activation_norms=None) -> Allowance:
        """The sound test's terms for inputs ``x``. ``activation_norms``: the computed
        ‖h̃_{l−1}(x)‖ entering each affine step and the feature norm ‖h̃(x)‖ (from the
        certifying forward pass), or None for the a-priori bound."""
        if activation_norms is None or self.steps is None:
            return self._allowance_a_priori(self.input_norms(x))
        step_norms, feat = activation_norms
        feat = up_tensor(feat)
        zero = torch.zeros_like(feat)
        delta, dp, dp_slope = zero, zero, zero       # Δ(x); Δ(x′) = dp + ε·dp_slope
        eps_max = torch.full_like(feat, math.inf)
        norms = iter(step_norms)
        for step in self.steps:
            if step is None:
                continue
            n = up_tensor(next(norms))
            u_, a, g, b, uf = step.lipschitz, step.abs_norm, step.gamma, step.offset, step.underflow
            reach = up_tensor(a * n + b)
            far = up_tensor(up_tensor(n + delta) + dp)               # ‖h̃(x′)‖ at ε = 0
            far_slope = up_tensor(step.lipschitz_before + dp_slope)
            reach_far = up_tensor(a * far + b)
            reach_far_slope = up_tensor(a * far_slope)
            eps_max = torch.minimum(eps_max, _eps_limit(reach * up(1.0 + g), reach_far * up(1.0 + g),
                                                        reach_far_slope * up(1.0 + g), self.cap))
            delta = up_tensor(up_tensor(u_ * delta) + up_tensor(g * reach + uf))
            dp = up_tensor(up_tensor(u_ * dp) + up_tensor(g * reach_far + uf))
            dp_slope = up_tensor(up_tensor(u_ * dp_slope) + up_tensor(g * reach_far_slope))
        if next(norms, None) is not None:
            raise RuntimeError("activation norms do not match the layers' steps")
        rho, rho_far, rho_far_slope, head_max = self._head(feat, delta, dp, dp_slope)
        finite = torch.isfinite(feat) & torch.isfinite(delta)
        eps_max = torch.where(finite, torch.minimum(eps_max, head_max), torch.full_like(feat, -math.inf))
        return Allowance(
            s1=up_tensor(delta + dp), s1_slope=up_tensor(self.lipschitz + dp_slope),
            s0=up_tensor(2.0 * up_tensor(rho + rho_far)), s0_slope=up_tensor(2.0 * rho_far_slope),
            eps_max=eps_max, body_error=delta, logit_error=rho,
        )

    def _allowance_a_priori(self, r: torch.Tensor) -> Allowance:
        """Δ(x) + Δ(x′) = e.a(2r + ε) + 2e.b and ρ likewise, with ‖h̃‖ ≤ (norm + error)(r)."""
        e, nrm = self.body_error, self.body_norm
        delta = up_tensor(e.a * r + e.b)
        feat = up_tensor(up_tensor((nrm.a + e.a) * r) + (nrm.b + e.b))
        # at x′ every norm grows by at most ε times the same slopes
        g, w, b, uf = self.head_gamma, self.w_max, self.b_max, self.head_underflow
        rho = up_tensor(g * up_tensor(w * feat + b) + uf)
        rho_slope = up(g * w * up(nrm.a + e.a))
        eps_max = (self.max_input_norm - r).clamp_min(-math.inf) * (1.0 - 2.0 ** -50)
        eps_max = torch.where(torch.isfinite(r) & (r <= self.max_input_norm), eps_max,
                              torch.full_like(r, -math.inf))
        return Allowance(
            s1=up_tensor(2.0 * delta), s1_slope=torch.full_like(r, up(self.lipschitz + e.a)),
            s0=up_tensor(4.0 * rho), s0_slope=torch.full_like(r, up(2.0 * rho_slope)),
            eps_max=eps_max, body_error=delta, logit_error=rho,
        )

    # -- decisions ------------------------------------------------------------------
    def bottom(self, logits: torch.Tensor, allowance: Allowance, epsilon: float):
        """(f_⊥ rounded up to the logits' dtype, certified mask) at radius ``epsilon``:
        f_⊥ = max_{i≠j}(f̃_i + D_ji s1(ε)) + s0(ε), so that f̃_j > f_⊥ is the sound test
        (the upward rounding of f_⊥ only rejects more)."""
        f = logits.detach().to(torch.float64)
        top = f.argmax(dim=1)
        eps = float(epsilon)
        s1 = up_tensor(allowance.s1 + up_tensor(eps * allowance.s1_slope))
        s0 = up_tensor(allowance.s0 + up_tensor(eps * allowance.s0_slope))
        d = self.distances.index_select(0, top)                        # (B, C): D_ji
        rival = up_tensor_signed(f + up_tensor(d * s1.unsqueeze(1)))
        own = torch.nn.functional.one_hot(top, f.shape[1]).bool()
        rival = rival.masked_fill(own, -math.inf).amax(dim=1)
        bottom64 = up_tensor_signed(rival + s0)
        fj = f.gather(1, top.unsqueeze(1)).squeeze(1)
        ok = torch.isfinite(f).all(dim=1) & (allowance.eps_max >= eps) & ~torch.isnan(bottom64)
        certified = (fj > bottom64) & ok
        bottom64 = torch.where(ok, bottom64, torch.full_like(bottom64, math.inf))
        bottom = bottom64.to(logits.dtype)
        bottom = torch.where(bottom.to(torch.float64) < bottom64,
                             torch.nextafter(bottom, torch.full_like(bottom, math.inf)), bottom)
        return bottom, certified

    def radius(self, logits: torch.Tensor, allowance: Allowance) -> torch.Tensor:
        """The largest ε at which the sound test passes, rounded down, per sample:
        r_ji = (g_ji − D_ji s1 − s0) / (D_ji s1_slope + s0_slope), min over i ≠ j, clamped
        to [0, eps_max]."""
        f = logits.detach().to(torch.float64)
        top = f.argmax(dim=1)
        d = self.distances.index_select(0, top)
        gap = f.gather(1, top.unsqueeze(1)) - f                           # ≥ 0
        gap_down = gap * (1.0 - 2.0 ** -50)
        numer = gap_down - up_tensor(up_tensor(d * allowance.s1.unsqueeze(1)) + allowance.s0.unsqueeze(1))
        denom = up_tensor(up_tensor(d * allowance.s1_slope.unsqueeze(1)) + allowance.s0_slope.unsqueeze(1))
        ratio = torch.where(denom > 0, numer / denom,
                            torch.where(numer > 0, torch.full_like(numer, math.inf), torch.zeros_like(numer)))
        ratio = ratio * (1.0 - 2.0 ** -50)
        own = torch.nn.functional.one_hot(top, f.shape[1]).bool()
        radius = ratio.masked_fill(own, math.inf).amin(dim=1)
        radius = torch.minimum(radius, allowance.eps_max * (1.0 - 2.0 ** -50)).clamp_min(0.0)
        ok = torch.isfinite(f).all(dim=1) & ~torch.isnan(radius)
        return torch.where(ok, radius, torch.zeros_like(radius))


def _eps_limit(at_x, far, far_slope, cap):
    """The largest ε with far + ε·far_slope ≤ cap, or −inf if at_x or far already exceed it."""
    room = (cap - far) / far_slope.clamp_min(torch.finfo(torch.float64).tiny)
    room = torch.where(far_slope > 0, room * (1.0 - 2.0 ** -50), torch.full_like(room, math.inf))
    bad = ~((at_x <= cap) & (far <= cap))
    return torch.where(bad, torch.full_like(room, -math.inf), room)


def up_tensor_signed(x: torch.Tensor) -> torch.Tensor:
    """A float64 tensor ≥ the exact value of the last operation producing ``x`` (any sign)."""
    return x + (x.abs() * 2.0 ** -50 + 2.0 ** -1074)


class BoundCache:
    """Computed bounds of one model, valid until any parameter changes.

    The key holds every parameter's storage pointer, version counter, dtype, device and
    shape (host-side, no synchronisation). Version counters miss in-place edits through
    ``p.data``, so a copy of the weights is kept and compared as well: with a host
    decision on the slow path (:meth:`valid_for`, which then recomputes), as a 0-dim
    boolean tensor on the hot path (:meth:`current`), which certification turns into "not
    certified" — a changed weight never meets a cached bound, and no host synchronisation.
    """

    def __init__(self) -> None:
        self._key = None
        self._snapshot: List[torch.Tensor] = []
        self.values: Dict[str, object] = {}

    @staticmethod
    def _key_of(model, extra):
        return tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                     for p in model.parameters()) + tuple(extra)

    def _refresh(self, key, params) -> None:
        self._key = key
        self._snapshot = [p.clone() for p in params]
        self.values = {}

    def valid_for(self, model: torch.nn.Module, extra=()) -> Dict[str, object]:
        """The values, emptied first unless the weights are exactly those cached (slow path:
        the value comparison synchronises with the host)."""
        key = self._key_of(model, extra)
        params = [p.detach() for p in model.parameters()]
        if not (self._key == key and len(self._snapshot) == len(params)
                and all(torch.equal(a, b) for a, b in zip(self._snapshot, params))):
            self._refresh(key, params)
        return self.values

    def current(self, model: torch.nn.Module, extra=()):
        """``(values, same)`` without a host synchronisation when the key is unchanged:
        ``same`` is a 0-dim bool tensor, False when a weight was edited behind the version
        counter; a changed key empties the values (``same`` is then None)."""
        key = self._key_of(model, extra)
        params = [p.detach() for p in model.parameters()]
        if self._key == key and len(self._snapshot) == len(params):
            same = torch.stack([torch.eq(a, b).all() for a, b in zip(self._snapshot, params)]).all()
            return self.values, same
        self._refresh(key, params)
        return self.values, None


def _named_layers(model) -> List[Tuple[str, LipschitzModule]]:
    """The leaf Lipschitz layers of the body (and the head), in order, with their names."""
    out = []
    for name, module in model.body.named_modules(prefix="body"):
        if isinstance(module, LipschitzModule) and not _has_lipschitz_descendant(module):
            out.append((name, module))
    return out


def _has_lipschitz_descendant(module) -> bool:
    return any(isinstance(m, LipschitzModule) for m in module.modules() if m is not module)


def compute_estimate(model) -> EstimateBounds:
    """Converged power iterations, the GloRo paper's rule: each layer until σ̂ changes by
    ≤ tol relatively in one iteration (:meth:`PowerIterationModule.converge` without an
    upper bound, so the result never depends on one), or max_iter. The brackets' lower
    ends come from the converged iterates; their upper ends are filled in by
    :func:`with_uppers`."""
    brackets = []
    layers = [(n, m) for n, m in _named_layers(model)]
    if model.bound == "global":
        layers.append(("head", model.head))
    # K is the product of the layers' values when the body is a chain (Sequential); other
    # containers compose their own bound from their layers' converged iterates
    chain = _is_chain(model)
    for name, layer in layers:
        if isinstance(layer, PowerIterationModule):
            if not layer.iterate_initialized:
                raise RuntimeError(
                    "the model's input size is unknown: pass input_shape= to GloroNet or run a "
                    "forward pass before asking for its bounds"
                )
            result = layer.converge(model.tol, model.max_iter, upper=math.inf, update=not chain)
            lower = float(result.lower)
            brackets.append(LayerBracket(name, type(layer).__name__, lower, math.nan,
                                         float(result.estimate), result.iterations, result.status))
            if result.status == "max_iter":
                warnings.warn(
                    f"power iteration of {name} ({type(layer).__name__}) ended 'max_iter' after "
                    f"{result.iterations} iterations (σ̂ = {float(result.estimate):.6g}, provable "
                    f"lower bound {lower:.6g}): its σ̂ may underestimate the norm "
                    "(certificate='estimate' is not a proof; the sound certificate is unaffected)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        else:
            try:
                lower, upper = float(layer.lipschitz_lower_bound()), float(layer.lipschitz_upper_bound())
            except NotImplementedError:
                lower = upper = math.nan
            brackets.append(LayerBracket(name, type(layer).__name__, lower, upper))
    with torch.no_grad():
        ref = model.head.weight
        if not chain:
            lipschitz = model._as_tensor(model.body.lipschitz_bound(0)).detach()
            if model.bound == "margin":
                distances = class_distances(model.head.weight, exact=True).detach()
            else:
                distances = model._global_distances(model.head.lipschitz_bound(0)).detach()
            return EstimateBounds(lipschitz, distances, tuple(brackets))
        lipschitz = torch.ones((), dtype=ref.dtype, device=ref.device)
        head_sigma = None
        for bracket, (name, layer) in zip(brackets, layers):
            value = bracket.estimate if bracket.estimate is not None else layer.lipschitz_bound(0)
            if layer is model.head:
                head_sigma = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
            else:
                lipschitz = lipschitz * torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
        if model.bound == "margin":
            distances = class_distances(model.head.weight, exact=True).detach()
        else:
            distances = model._global_distances(head_sigma).detach()
    return EstimateBounds(lipschitz, distances, tuple(brackets))


def with_uppers(model, brackets, uppers: Dict[int, Optional[float]]) -> List[LayerBracket]:
    """The brackets with their provable upper ends, warning when a power iteration stopped
    with a bracket wider than 5 % (its estimate may be far below the norm)."""
    by_name = {name: id(layer) for name, layer in _named_layers(model) + [("head", model.head)]}
    out = []
    for b in brackets:
        upper = uppers.get(by_name.get(b.name))
        upper = math.nan if upper is None else upper
        b = LayerBracket(b.name, b.layer, b.lower, upper, b.estimate, b.iterations, b.status)
        if b.status is not None and not b.ratio - 1.0 <= _BRACKET_WARN:
            warnings.warn(
                f"power iteration of {b.name} ({b.layer}) stopped ('{b.status}', {b.iterations} "
                f"iterations) with bracket [{b.lower:.6g}, {b.upper:.6g}]: its σ̂ may be far "
                "below the norm (certificate='estimate' is not a proof; the sound certificate "
                "is unaffected)",
                RuntimeWarning,
                stacklevel=3,
            )
        out.append(b)
    return out


def upper_bounds(model) -> Dict[int, Optional[float]]:
    """id(layer) → provable upper bound of every leaf layer and the head (None for a layer
    that has none), warning with the layer's name when one is not finite."""
    layers = _named_layers(model) + [("head", model.head)]
    out: Dict[int, Optional[float]] = {}
    for name, layer in layers:
        try:
            value = float(layer.lipschitz_upper_bound())
        except NotImplementedError:
            out[id(layer)] = None
            continue
        if not math.isfinite(value):
            warnings.warn(
                f"{name} ({type(layer).__name__}): its provable Lipschitz upper bound is not "
                "finite (non-finite or overflowing weights); nothing will be certified",
                RuntimeWarning,
                stacklevel=4,
            )
            value = math.inf
        out[id(layer)] = value
    return out


def _inferred_input_shape(model) -> Tuple[int, ...]:
    """The sample shape of a model that has not seen an input yet, from its first layer."""
    layers = _named_layers(model)
    first = layers[0][1] if layers else None
    if isinstance(first, Linear):
        return (first.in_features,)
    shape = getattr(first, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    raise RuntimeError(
        "the model's input size is unknown: pass input_shape= to GloroNet or run a forward "
        "pass before asking for its sound bounds"
    )


def _distance_upper(weight: torch.Tensor) -> torch.Tensor:
    """D_ji ≥ ‖w_j − w_i‖ (float64, CPU): direct differences (no Gram cancellation); each
    entry is √(Σ_k d_k²) of d + 1 roundings (difference, square, sum, root)."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        return torch.full((w.shape[0], w.shape[0]), math.inf, dtype=torch.float64)
    d = torch.cdist(w, w, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    slack = up(1.0 + gamma(w.shape[1] + 3, U64))
    d = up_tensor(d * slack)
    return d.fill_diagonal_(0.0)  # D_jj is never used (j is masked); keep K_jj = 0


def compute_sound(model, uppers: Dict[int, Optional[float]]) -> SoundBounds:
    """Provable bounds (see the module docstring); raises NotImplementedError naming a
    layer that has no provable bound. ``uppers`` from :func:`upper_bounds`."""
    head = model.head
    input_shape = model.input_shape or _inferred_input_shape(model)
    arith = Arithmetic.of(head.weight.dtype)
    names = {id(m): (n, type(m).__name__) for n, m in _named_layers(model) + [("head", head)]}
    for key, (name, kind) in names.items():
        if uppers.get(key, 0.0) is None:
            raise NotImplementedError(
                f"{name} ({kind}) has no provable Lipschitz upper bound, so certificate='sound' "
                "cannot certify this model: implement lipschitz_upper_bound() and "
                "forward_bound() for it, or use certificate='estimate'"
            )
    uppers = dict(uppers)

    def upper_of(layer):
        if uppers.get(id(layer)) is None:
            uppers[id(layer)] = float(layer.lipschitz_upper_bound())
        return uppers[id(layer)]

    fb = model.body.forward_bound(ForwardBound(tuple(input_shape)), arith, upper_of)
    if tuple(fb.shape) != (head.in_features,):
        raise ValueError(
            f"the body maps samples to shape {tuple(fb.shape)}, the head expects ({head.in_features},)"
        )
    w = head.weight.detach().to(device="cpu", dtype=torch.float64)
    if model.bound == "margin":
        distances = _distance_upper(head.weight)
    else:
        off = 1.0 - torch.eye(head.out_features, dtype=torch.float64)
        distances = off * up(_SQRT2_UP * spectral_norm_upper(head.weight))
    # head rounding: |f̃_i − (w_iᵀh̃ + b_i)| ≤ γ_{d+2}(‖w_i‖‖h̃‖ + |b_i|) + (d+2)η
    g = gamma(head.in_features + 2, arith.u)
    w_max = up(float(torch.linalg.vector_norm(w, dim=1).amax()) * (1.0 + gamma(w.shape[1], U64)))
    b_max = 0.0
    if head.bias is not None:
        b_max = float(head.bias.detach().to(device="cpu", dtype=torch.float64).abs().max())
    underflow = up((head.in_features + 2) * arith.eta)
    reach = fb.computed_norm().scale(w_max).shift(b_max)
    rounding = reach.scale(g).shift(underflow)
    limits = ForwardBound(fb.shape, fb.lipschitz, fb.norm, fb.error,
                          fb.limits + (reach.scale(up(1.0 + g)),))
    finite_weights = all(math.isfinite(v) for v in uppers.values() if v is not None)
    if finite_weights and not math.isfinite(fb.error.a + fb.error.b + rounding.a + rounding.b):
        warnings.warn(
            f"the rounding error of a {arith.dtype} forward pass of this network cannot be "
            "bounded usefully (unit roundoff × fan-in ≥ ½): nothing will be certified soundly",
            RuntimeWarning,
            stacklevel=4,
        )
    leaves = _named_layers(model)
    steps = tuple(fb.steps) if _is_chain(model) and len(fb.steps) == len(leaves) else None
    table = tuple((n, t, uppers[i]) for i, (n, t) in names.items() if i in uppers)
    return SoundBounds(
        lipschitz=fb.lipschitz, distances=distances.to(head.weight.device), steps=steps,
        body_norm=fb.norm, body_error=fb.error, head_gamma=g, head_underflow=underflow,
        w_max=w_max, b_max=b_max, cap=arith.realmax / 2.0,
        max_input_norm=limits.max_input_norm(arith), uppers=table, dtype=arith.dtype,
    )


def _is_chain(model) -> bool:
    """Whether the body's leaf layers, run in order, are the body (every container in it
    is a Sequential)."""
    return all(isinstance(m, Sequential) for m in model.body.modules()
               if isinstance(m, LipschitzModule) and _has_lipschitz_descendant(m))


def chain_layers(model) -> List[LipschitzModule]:
    """The body's leaf layers in order (valid as a forward pass when :func:`_is_chain`)."""
    return [layer for _, layer in _named_layers(model)]
