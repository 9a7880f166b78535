"""The Lipschitz bounds a :class:`~gloro_fast.GloroNet` certifies with: how they are computed
(:mod:`gloro_fast.bound_cache` keeps them per set of weights and guards against stale ones).

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
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .nn import Linear, LipschitzModule, PowerIterationModule, Sequential
from .ops import class_distances, norm_basis
from .sound.decision import Allowance, AllowanceForms, Form, LinearForms, decide
from .sound.decision import radius as sound_radius
from .sound.dense import spectral_norm_upper
from .sound.forward_error import Affine, AffineStep, Arithmetic, ForwardBound, norm_terms
from .sound.rounding import U64, gamma, up, up_tensor

__all__ = ["Allowance", "AllowanceForms", "EstimateBounds", "LayerBracket", "LinearForms",
           "SoundBounds",
           "CERTIFICATES", "check_certificate", "chain_layers", "compute_estimate", "compute_sound",
           "global_distances", "inferred_input_shape", "is_chain", "model_tensor", "named_layers",
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


def _per_sample_forms(steps, lipschitz, head, cap, device) -> LinearForms:
    """The recursion of docs/soundness.md on linear forms of (n_1, …, n_k, ‖h̃‖, 1):
    Δ_l = U Δ_{l−1} + γ(α n_l + β) + uf at x, and in the ball with
    ‖h̃_{l−1}(x′)‖ ≤ n_l + Δ_{l−1}(x) + L_{<l}ε + Δ_{l−1}(x′)."""
    affine = [st for st in steps if st is not None]
    size = len(affine) + 2
    feat_index = size - 2
    zero = Form([0.0] * size)
    delta, far_delta, limits = zero, zero, []
    for k, st in enumerate(affine):
        n = Form.unit(size, k)
        reach = (n * st.abs_norm).plus_const(st.offset)
        far = (n + delta + far_delta).plus_slope(st.lipschitz_before)
        reach_far = (far * st.abs_norm).plus_const(st.offset)
        limits += [reach * up(1.0 + st.gamma), reach_far * up(1.0 + st.gamma)]
        delta = (delta * st.lipschitz + reach * st.gamma).plus_const(st.underflow)
        far_delta = (far_delta * st.lipschitz + reach_far * st.gamma).plus_const(st.underflow)
    g, w_max, b_max, uf = head
    feat = Form.unit(size, feat_index)
    reach = (feat * w_max).plus_const(b_max)
    far_feat = (feat + delta + far_delta).plus_slope(lipschitz)
    reach_far = (far_feat * w_max).plus_const(b_max)
    rho = (reach * g).plus_const(uf)
    rho_far = (reach_far * g).plus_const(uf)
    limits += [reach * up(1.0 + g), reach_far * up(1.0 + g)]
    s1 = (delta + far_delta).plus_slope(lipschitz)
    s0 = (rho + rho_far) * 2.0
    return LinearForms.build(s1, s0, delta, rho, limits, cap, device)


def _a_priori_forms(fb, lipschitz, head, cap, device) -> LinearForms:
    """The same terms from ‖x‖ alone (basis (‖x‖, 1)): the body's a-priori error Δ(r) and
    norm bound, every layer's overflow limit, at r and at r + ε."""
    g, w_max, b_max, uf = head

    def form(affine, slope=0.0):
        return Form([affine.a, affine.b], slope)

    delta = form(fb.error)
    far_delta = form(fb.error, fb.error.a)
    computed = fb.computed_norm()
    reach = form(computed) * w_max
    reach = reach.plus_const(b_max)
    reach_far = (form(computed, computed.a) * w_max).plus_const(b_max)
    rho = (reach * g).plus_const(uf)
    rho_far = (reach_far * g).plus_const(uf)
    limits = [form(lim) for lim in fb.limits] + [form(lim, lim.a) for lim in fb.limits]
    limits += [reach * up(1.0 + g), reach_far * up(1.0 + g)]
    s1 = (delta + far_delta).plus_slope(lipschitz)
    s0 = (rho + rho_far) * 2.0
    return LinearForms.build(s1, s0, delta, rho, limits, cap, device)


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
    forms: AllowanceForms          # every term of the test as linear forms of per-sample norms

    # -- the allowance -------------------------------------------------------------
    @staticmethod
    def input_norms(x: torch.Tensor) -> torch.Tensor:
        """‖x‖ per sample, float64, rounded up."""
        flat = x.detach().flatten(1)
        norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
        return up_tensor(norms * (1.0 + gamma(max(flat.shape[1], 1), U64)))

    def allowance(self, x: torch.Tensor, activation_norms=None) -> Allowance:
        """The sound test's terms for inputs ``x``. ``activation_norms``: the computed
        ‖h̃_{l−1}(x)‖ entering each affine step and the feature norm ‖h̃(x)‖ (from the
        certifying forward pass, each (B,) float64 rounded up), or None for the a-priori
        bound from ‖x‖. Every term is a precomputed linear form of these norms
        (:class:`AllowanceForms`): one small matrix product per batch."""
        forms, basis = self.basis(x, activation_norms)
        return forms.evaluate(basis)

    def basis(self, x: torch.Tensor, activation_norms=None) -> Tuple[LinearForms, torch.Tensor]:
        """The forms :meth:`allowance` evaluates and their per-sample basis (B, m) float64
        (the norms, last column 1)."""
        if activation_norms is None or self.forms.per_sample is None:
            forms = self.forms.a_priori
            basis = torch.stack([self.input_norms(x), torch.ones(x.shape[0], dtype=torch.float64,
                                                                 device=x.device)], dim=1)
        else:
            step_norms, feat = activation_norms
            forms = self.forms.per_sample
            if len(step_norms) + 2 != forms.size:
                raise RuntimeError("activation norms do not match the layers' steps")
            ones = torch.ones_like(feat)
            basis = torch.stack(list(step_norms) + [feat, ones], dim=1)
        return forms, basis

    def per_sample_basis(self, bounds) -> Tuple[LinearForms, torch.Tensor]:
        """The per-sample forms and their basis (B, m) float64 from the norm bounds the
        certifying pass recorded (the inputs of the affine layers, then the features): each a
        (B,) float64 tensor, or a :class:`~gloro_fast.sound.forward_error.SumOfSquares` or
        :class:`~gloro_fast.sound.forward_error.MeasuredNorm` finished here. One
        :func:`gloro_fast.ops.norm_basis` call: :func:`~gloro_fast.sound.forward_error.norm_uppers`
        followed by :meth:`basis` (its bits on the reference kernels; the C++ kernel's square
        root is correctly rounded, torch's faithful)."""
        forms = self.forms.per_sample
        if forms is None or len(bounds) + 1 != forms.size:
            raise RuntimeError("activation norms do not match the layers' steps")
        return forms, norm_basis(*norm_terms(bounds))

    # -- decisions ------------------------------------------------------------------
    def bottom(self, logits: torch.Tensor, allowance: Allowance, epsilon: float):
        """(f_⊥ rounded up to the logits' dtype, certified mask) at radius ``epsilon``
        (:func:`gloro_fast.sound.decision.decide`: f̃_j > f_⊥ is the sound test; the upward
        rounding of f_⊥ only rejects more)."""
        bottom64, certified, _ = decide(logits, self.distances, allowance, float(epsilon))
        return self.round_bottom(bottom64, logits.dtype), certified

    @staticmethod
    def round_bottom(bottom64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """f_⊥ (float64) in ``dtype``, rounded up."""
        bottom = bottom64.to(dtype)
        return torch.where(bottom.to(torch.float64) < bottom64,
                           torch.nextafter(bottom, torch.full_like(bottom, math.inf)), bottom)

    def radius(self, logits: torch.Tensor, allowance: Allowance) -> torch.Tensor:
        """The largest ε at which the sound test passes, rounded down, per sample
        (:func:`gloro_fast.sound.decision.radius`)."""
        return sound_radius(logits, self.distances, allowance)


def model_tensor(model, value) -> torch.Tensor:
    """``value`` (a number or tensor) as a tensor of the model's dtype, on its device."""
    ref = model.head.weight
    if isinstance(value, torch.Tensor):
        return value.to(dtype=ref.dtype)
    return torch.tensor(float(value), dtype=ref.dtype, device=ref.device)


def global_distances(model, sigma_head: torch.Tensor) -> torch.Tensor:
    """D of ``bound="global"``: √2 σ_head off the diagonal, 0 on it (C, C), model dtype."""
    ref = model.head.weight
    off = 1.0 - torch.eye(model.head.out_features, dtype=ref.dtype, device=ref.device)
    return (math.sqrt(2.0) * sigma_head) * off


def named_layers(model) -> List[Tuple[str, LipschitzModule]]:
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
    layers = [(n, m) for n, m in named_layers(model)]
    if model.bound == "global":
        layers.append(("head", model.head))
    # K is the product of the layers' values when the body is a chain (Sequential); other
    # containers compose their own bound from their layers' converged iterates
    chain = is_chain(model)
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
            lipschitz = model_tensor(model, model.body.lipschitz_bound(0)).detach()
            if model.bound == "margin":
                distances = class_distances(model.head.weight, exact=True).detach()
            else:
                distances = global_distances(model, model.head.lipschitz_bound(0)).detach()
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
            distances = global_distances(model, head_sigma).detach()
    return EstimateBounds(lipschitz, distances, tuple(brackets))


def with_uppers(model, brackets, uppers: Dict[int, Optional[float]]) -> List[LayerBracket]:
    """The brackets with their provable upper ends, warning when a power iteration stopped
    with a bracket wider than 5 % (its estimate may be far below the norm)."""
    by_name = {name: id(layer) for name, layer in named_layers(model) + [("head", model.head)]}
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
    layers = named_layers(model) + [("head", model.head)]
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


def inferred_input_shape(model) -> Tuple[int, ...]:
    """The sample shape of a model that has not seen an input yet, from its first layer."""
    layers = named_layers(model)
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
    input_shape = model.input_shape or inferred_input_shape(model)
    arith = Arithmetic.of(head.weight.dtype)
    names = {id(m): (n, type(m).__name__) for n, m in named_layers(model) + [("head", head)]}
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
    leaves = named_layers(model)
    steps = tuple(fb.steps) if is_chain(model) and len(fb.steps) == len(leaves) else None
    table = tuple((n, t, uppers[i]) for i, (n, t) in names.items() if i in uppers)
    device = head.weight.device
    head_terms = (g, w_max, b_max, underflow)
    cap = arith.realmax / 2.0
    forms = AllowanceForms(
        per_sample=None if steps is None else _per_sample_forms(steps, fb.lipschitz, head_terms, cap, device),
        a_priori=_a_priori_forms(fb, fb.lipschitz, head_terms, cap, device),
    )
    return SoundBounds(
        lipschitz=fb.lipschitz, distances=distances.to(device), steps=steps,
        body_norm=fb.norm, body_error=fb.error, head_gamma=g, head_underflow=underflow,
        w_max=w_max, b_max=b_max, cap=cap,
        max_input_norm=limits.max_input_norm(arith), uppers=table, dtype=arith.dtype, forms=forms,
    )


def is_chain(model) -> bool:
    """Whether the body's leaf layers, run in order, are the body (every container in it
    is a Sequential)."""
    return all(isinstance(m, Sequential) for m in model.body.modules()
               if isinstance(m, LipschitzModule) and _has_lipschitz_descendant(m))


def chain_layers(model) -> List[LipschitzModule]:
    """The body's leaf layers in order (valid as a forward pass when :func:`is_chain`)."""
    return [layer for _, layer in named_layers(model)]
