"""GloroNet: a Lipschitz-bounded body and a linear head, with the ⊥ logit appended.

Logits f = W h(x) + b with ‖h‖_Lip ≤ K. With j = argmax f (lowest index on ties):

    margin bound (default):  K_ji = K · ‖w_j − w_i‖₂
    global bound:            K_ji = √2 · K · ‖W‖₂           (i ≠ j)
    f_⊥ = max_{i≠j} (f_i + ε K_ji)

x is certified at radius ε iff f_j − f_i > ε K_ji for every i ≠ j, i.e. iff f_j > f_⊥;
its certified radius is max(0, min_{i≠j} (f_j − f_i) / K_ji).

Certification (``certify``, ``certified_radius``, eval-mode ``forward``) is *sound* by
default: K and K_ji are provable upper bounds and the test adds an allowance for the
rounding of the forward pass (:mod:`gloro_fast.bounds`). ``certificate="estimate"`` gives
the GloRo paper's numbers (converged power iteration, no allowance): an estimate.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ._validation import (
    BOUNDS,
    check_batch_shape,
    check_choice,
    check_epsilon,
    check_finite,
    check_input_shape,
    check_positive_int,
    check_tensor,
)
from .bound_cache import cached_bounds, cached_chain, clear_cached_bounds, training_bounds
from .bounds import EstimateBounds, LayerBracket, SoundBounds, check_certificate
from .nn import Conv2d, Flatten, Linear, LiResBlock, MinMax, from_torch
from .nn.conv import channels_last
from .ops import bottom_logit, sound_decision
from .sound.forward_error import ieee_arithmetic, measured_norm
from .sound.rounding import up_tensor

__all__ = ["GloroNet", "GloroOutput"]


class GloroOutput(NamedTuple):
    """Everything one GloRo forward computes.

    logits: f (B, C); bottom: f_⊥ (B,); lipschitz: K (0-dim); distances: D (C, C) with
    K_ji = K · D_ji (for ``bound="global"``, D = √2‖W‖₂ off the diagonal).
    """

    logits: torch.Tensor
    bottom: torch.Tensor
    lipschitz: torch.Tensor
    distances: torch.Tensor

    @property
    def augmented(self) -> torch.Tensor:
        """[f, f_⊥]: (B, C + 1), the ⊥ logit last."""
        return torch.cat([self.logits, self.bottom.unsqueeze(1)], dim=1)

    @property
    def margin_lipschitz(self) -> torch.Tensor:
        """K_ji (C, C)."""
        return self.lipschitz * self.distances


def _ends_a_layout(layers, i: int) -> bool:
    """Whether layer i is a MinMax whose output is flattened or leaves the body next: it
    writes its output contiguous (the flattened order) whatever its input's layout."""
    return isinstance(layers[i], MinMax) and (i + 1 == len(layers) or isinstance(layers[i + 1], Flatten))


# layers whose certifying output is a new tensor nothing else holds (exact types: a subclass
# may return something it keeps)
_FRESH_OUTPUTS = (Conv2d, LiResBlock, Linear)


def _overwritable(layers, i: int, h: torch.Tensor) -> bool:
    """Whether layer i is a MinMax whose input h the certifying pass may overwrite: h is the
    fresh output of a gloro_fast Conv2d, LiResBlock or Linear just before it (nothing else
    holds it: not the caller's x, not a layer's state, not a forward hook's record: a layer
    with forward hooks, its own or global ones, is left alone) and no autograd graph
    records it. Under torch.compile the op is functionalised and Inductor's reinplacing pass
    writes it over the convolution's buffer again (read by nothing else): 2C2F B=1024
    compiled certify 22 -> 14.5 ms when fresh buffers are faulted in (one process, 40
    interleaved rounds)."""
    previous = layers[i - 1] if i > 0 else None
    return (isinstance(layers[i], MinMax) and type(previous) in _FRESH_OUTPUTS
            and not (previous._forward_hooks or nn.modules.module._global_forward_hooks)
            and not (h.requires_grad and torch.is_grad_enabled()))


def _convolution_layout(x: torch.Tensor, first) -> torch.Tensor:
    """x as the certifying pass feeds it to the body's first layer ``first``: channels_last
    (:func:`gloro_fast.nn.channels_last`) on the CPU when that layer is a convolution, else x
    itself. Also under torch.compile: from a one-channel NCHW input Inductor's first
    convolution wrote NCHW, and the MinMax op after it (which keeps its input's layout)
    left Inductor a 12.8 MB layout change before the next convolution (2C2F B=1024)."""
    if x.dim() != 4 or x.device.type != "cpu" or not isinstance(first, Conv2d):
        return x
    return channels_last(x)


class GloroNet(nn.Module):
    """A globally-robust network (Leino et al. 2021).

    Args:
        body: a :class:`gloro_fast.nn.LipschitzModule` (torch.nn.Sequential is converted
            with :func:`gloro_fast.nn.from_torch`), mapping x to features h (B, d).
        head: ``gloro_fast.nn.Linear(d, C)`` (a torch ``nn.Linear`` is converted), C ≥ 2.
        epsilon: certification radius ε ≥ 0 (l2).
        bound: ``"margin"`` (default) or ``"global"``.
        input_shape: shape of one input (e.g. (1, 28, 28)); fixes the convolution
            operators' input size at construction. Otherwise learnt at the first forward
            (later inputs of another shape are a ValueError naming x).
        n_iter: power iterations per training forward (no autograd) before σ̂.
        tol, max_iter: the power iteration behind ``certificate="estimate"`` and the
            brackets stops when upper/σ̂ − 1 ≤ tol (the bracket closed), when σ̂ changes by
            ≤ tol relatively in one iteration (stalled), or after max_iter (warning). Sound
            certificates never use them.

    In training mode every forward advances the power iteration by ``n_iter`` steps and
    uses σ̂ with autograd. In eval mode, and always in ``certify``/``certified_radius``/
    ``lipschitz_constant``, the certification bounds (``certificate="sound"`` by default,
    or ``"estimate"``) are used; they are computed once and cached until any parameter
    changes (in place or replaced), so a stale bound cannot be used.
    """

    def __init__(self, body: nn.Module, head: nn.Module, epsilon: float, bound: str = "margin",
                 input_shape: Optional[Sequence[int]] = None, n_iter: int = 1, tol: float = 1e-6,
                 max_iter: int = 1000) -> None:
        super().__init__()
        if not isinstance(body, nn.Module):
            raise TypeError(f"body must be an nn.Module, got {type(body).__name__}")
        self.body = from_torch(body)
        if isinstance(head, nn.Linear) and not isinstance(head, Linear):
            head = from_torch(head)
        if not isinstance(head, Linear):
            raise TypeError(
                f"head must be a gloro_fast.nn.Linear or torch.nn.Linear, got {type(head).__name__}"
            )
        if head.out_features < 2:
            raise ValueError(f"head must have at least 2 output classes, got {head.out_features}")
        self.head = head
        self.epsilon = check_epsilon(epsilon)
        self.bound = check_choice("bound", bound, BOUNDS)
        self.n_iter = check_positive_int("n_iter", n_iter, allow_zero=True)
        if not (isinstance(tol, (int, float)) and 0 < tol <= 1e-2):
            # a looser "convergence" would call a power iteration converged that is not
            raise ValueError(f"tol must be in (0, 0.01], got {tol!r}")
        self.tol = float(tol)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.input_shape = None
        if input_shape is not None:
            self.input_shape = check_input_shape(input_shape)
            ref = self.head.weight
            with torch.no_grad():
                features = self.body(torch.zeros((1,) + self.input_shape, dtype=ref.dtype, device=ref.device))
            if features.shape != (1, self.head.in_features):
                raise ValueError(
                    f"body maps input_shape {self.input_shape} to features of shape "
                    f"{tuple(features.shape[1:])}, but head expects ({self.head.in_features},)"
                )

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    # -- bounds (computed and cached by gloro_fast.bound_cache) -----------------------
    def clear_bound_cache(self) -> None:
        """Forget every cached bound (they are recomputed when next needed). Never needed
        for correctness: any change of a parameter already invalidates them."""
        clear_cached_bounds(self)

    def sound_bounds(self) -> SoundBounds:
        """The provable bounds sound certificates use (cached; see :mod:`gloro_fast.bounds`)."""
        return cached_bounds(self, "sound")

    def estimate_bounds(self) -> EstimateBounds:
        """Converged power-iteration bounds (cached): K = Π σ̂, D in the model's dtype."""
        return cached_bounds(self, "estimate")

    def lipschitz_constant(self, certificate: str = "sound") -> torch.Tensor:
        """K, a bound of the body's Lipschitz constant (0-dim, detached): ``"sound"`` a
        provable upper bound (float64), ``"estimate"`` the product of converged σ̂ (the
        model's dtype)."""
        if check_certificate(certificate) == "sound":
            return torch.tensor(self.sound_bounds().lipschitz, dtype=torch.float64,
                                device=self.head.weight.device)
        return self.estimate_bounds().lipschitz

    def margin_lipschitz(self, certificate: str = "sound") -> torch.Tensor:
        """K_ji (C, C), K_jj = 0 (detached). Sound: provable, float64 (the sound test adds the
        rounding allowance of the forward pass on top, see :mod:`gloro_fast.bounds`)."""
        if check_certificate(certificate) == "sound":
            sb = self.sound_bounds()
            return up_tensor(sb.lipschitz * sb.distances).fill_diagonal_(0.0)
        est = self.estimate_bounds()
        return est.lipschitz * est.distances

    def lipschitz_bracket(self) -> List[LayerBracket]:
        """Per layer, the provable bracket [lower, upper] of its Lipschitz constant: lower
        from the converged power iteration (the estimate's), upper the sound bound; with the
        iteration's count and outcome. Warns when a bracket is wider than 5 %."""
        return list(cached_bounds(self, "brackets"))

    # -- forward ----------------------------------------------------------------------
    def _check_input(self, x) -> None:
        check_tensor("x", x, min_ndim=2, floating=True)
        if self.input_shape is not None:
            check_batch_shape("x", x, self.input_shape)
        ref = self.head.weight
        if x.device != ref.device:
            raise ValueError(f"x must be on the model's device {ref.device}, got {x.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"x must have the model's dtype {ref.dtype}, got {x.dtype}")
        check_finite("x", x)

    def _logits(self, x: torch.Tensor, certifying: bool, first=None, checked: bool = False) -> torch.Tensor:
        """The logits; ``first``: the first layer of a body that is a chain, whose input the
        certifying pass lays out for it (:func:`_convolution_layout`); ``checked``: x was
        checked already."""
        if not checked:
            self._check_input(x)
        if certifying:
            # certificates are about the model's own dtype in IEEE arithmetic
            with ieee_arithmetic(x.device.type):
                logits = self.head(self.body(x if first is None else _convolution_layout(x, first)))
        else:
            logits = self.head(self.body(x))
        if self.input_shape is None:  # learnt at the first forward: later inputs must match
            self.input_shape = tuple(x.shape[1:])
        return logits

    def sound_forward(self, x: torch.Tensor):
        """The certifying forward pass: ``(logits, bounds, allowance)`` with the logits in
        the model's dtype (IEEE arithmetic, autocast off), :class:`~gloro_fast.bounds.SoundBounds`
        and the per-sample :class:`~gloro_fast.bounds.Allowance` (from the activation norms
        recorded on the way when the body is a chain of layers). ``bounds.bottom(logits,
        allowance, ε)`` and ``bounds.radius(logits, allowance)`` decide."""
        logits, sb, forms, basis, same = self._sound_basis(x)
        allowance = forms.evaluate(basis)
        if same is not None:  # a weight edited behind the version counters: certify nothing
            allowance = allowance.refuse_unless(same)
        return logits, sb, allowance

    def _check_before_bounds(self, x: torch.Tensor) -> None:
        """Check x before any bound is computed (bounds take seconds), the input size learnt
        first by a forward where the model has none yet."""
        if self.input_shape is None:
            self._logits(x, certifying=True)
        self._check_input(x)

    def _sound_basis(self, x: torch.Tensor):
        """The certifying pass up to the allowance: ``(logits, bounds, forms, basis, same)``,
        the allowance being ``forms.evaluate(basis)`` and ``same`` the stale-bound flag of
        :func:`~gloro_fast.bound_cache.cached_bounds` (None, or False: certify nothing)."""
        self._check_before_bounds(x)
        sb, same = cached_bounds(self, "sound", hot=True)
        if sb.steps is None:
            logits = self._logits(x, certifying=True)
            forms, basis = sb.basis(x)
        else:
            norms = []
            with ieee_arithmetic(x.device.type):
                h, known = x, None  # known: a bound of ‖h‖ a layer gave on the way (MinMax)
                layers = cached_chain(self)
                for i, (layer, step) in enumerate(zip(layers, sb.steps)):
                    if step is not None:
                        norms.append(measured_norm(h) if known is None else known)
                    if i == 0:  # after the input's norm, which reads x as it came
                        h = _convolution_layout(h, layer)
                    if isinstance(layer, MinMax):
                        # before a flatten the fused op writes the flattened order itself (no
                        # copy at the flatten, no second read of the activation for its norm);
                        # after a fresh convolution or dense output it writes over it (no new
                        # 12.8 MB tensor to fault in at 2C2F B=1024: eager certify / plain
                        # forward ~+5 %)
                        h, known = layer.certifying_forward_norm(
                            h, known, flattened_next=_ends_a_layout(layers, i),
                            overwrite=_overwritable(layers, i, h))
                    else:
                        h, known = layer.certifying_forward_norm(h, known)
                features = measured_norm(h) if known is None else known
                logits = self.head(h)
            # every norm finished in one op (the measured ones, the MinMax sums of squares)
            forms, basis = sb.per_sample_basis(norms + [features])
        return logits, sb, forms, basis, same

    def _estimate_forward(self, x: torch.Tensor):
        """(logits, estimate bounds, same): the certifying forward of the estimate, with the
        hot-path staleness flag of :func:`~gloro_fast.bound_cache.cached_bounds`."""
        self._check_before_bounds(x)
        est, same = cached_bounds(self, "estimate", hot=True)
        chain = cached_chain(self)
        logits = self._logits(x, certifying=True, first=chain[0] if chain else None, checked=True)
        return logits, est, same

    def _epsilon(self, epsilon) -> float:
        return self.epsilon if epsilon is None else check_epsilon(epsilon)

    def forward_parts(self, x: torch.Tensor, converged: Optional[bool] = None,
                      certificate: str = "sound", epsilon: Optional[float] = None) -> GloroOutput:
        """The GloRo forward with its pieces: see :class:`GloroOutput`.

        ``converged`` (default: ``not self.training``) selects cached certification bounds
        of kind ``certificate`` instead of the training-mode σ̂ with autograd; in sound mode
        f_⊥ includes the rounding allowance, so that f_j > f_⊥ is the sound test.
        ``epsilon`` (default: the model's) is the radius f_⊥ is computed for.
        """
        if converged is None:
            converged = not self.training
        eps = self._epsilon(epsilon)
        if not converged:
            logits = self._logits(x, certifying=False)
            lipschitz, distances = training_bounds(self)
            bottom, _ = bottom_logit(logits, distances, lipschitz, eps)
            return GloroOutput(logits, bottom, lipschitz, distances)
        if check_certificate(certificate) == "estimate":
            logits, est, same = self._estimate_forward(x)
            bottom, _ = bottom_logit(logits, est.distances, est.lipschitz, eps)
            if same is not None:
                bottom = torch.where(same, bottom, torch.full_like(bottom, math.inf))
            return GloroOutput(logits, bottom, est.lipschitz, est.distances)
        logits, sb, forms, basis, same = self._sound_basis(x)
        bottom64, _, _ = sound_decision(logits, sb.distances, basis, forms, eps)
        if same is not None:
            bottom64 = torch.where(same, bottom64, torch.full_like(bottom64, math.inf))
        bottom = sb.round_bottom(bottom64, logits.dtype)
        lipschitz = torch.tensor(sb.lipschitz, dtype=torch.float64, device=logits.device)
        return GloroOutput(logits, bottom, lipschitz, sb.distances)

    def forward(self, x: torch.Tensor, parts: bool = False):
        """(B, C + 1) logits [f, f_⊥]; with ``parts=True`` the :class:`GloroOutput` (so that
        wrappers that hook ``forward``, such as DistributedDataParallel, see the full step).
        In eval mode f_⊥ is the sound one: argmax = the soundly certified prediction."""
        out = self.forward_parts(x)
        return out if parts else out.augmented

    # -- certification --------------------------------------------------------------
    @torch.no_grad()
    def certify(self, x: torch.Tensor, epsilon: Optional[float] = None,
                certificate: str = "sound") -> torch.Tensor:
        """Certified predictions (B,) int64 in [0, C]: the class j where f_j − f_i > ε K_ji
        for every i ≠ j (sound: plus the rounding allowance, see :mod:`gloro_fast.bounds`),
        else C (⊥). ``epsilon`` defaults to the model's."""
        eps = self._epsilon(epsilon)
        if check_certificate(certificate) == "sound":
            # the allowance and the test in one op (gloro_fast.ops.sound_decision): the same
            # bits as sb.bottom(logits, forms.evaluate(basis), eps)
            logits, sb, forms, basis, same = self._sound_basis(x)
            _, certified, top = sound_decision(logits, sb.distances, basis, forms, eps)
        else:
            logits, est, same = self._estimate_forward(x)
            bottom, _ = bottom_logit(logits, est.distances, est.lipschitz, eps)
            certified = logits.amax(dim=1) > bottom
            top = logits.argmax(dim=1)
        if same is not None:
            certified = certified & same
        return torch.where(certified, top, torch.full_like(top, self.num_classes))

    @torch.no_grad()
    def certified_radius(self, x: torch.Tensor, certificate: str = "sound") -> torch.Tensor:
        """The largest l2 radius within which the prediction provably cannot change, (B,).

        ``"estimate"``: r(x) = max(0, min_{i≠j} (f_j − f_i) / K_ji) with converged σ̂ (a pair
        with K_ji = 0 never limits the radius unless f_i = f_j), in the model's dtype.
        ``"sound"``: the largest ε the sound test passes at (float64, rounded down)."""
        if check_certificate(certificate) == "sound":
            logits, sb, allowance = self.sound_forward(x)
            return sb.radius(logits, allowance)
        logits, est, same = self._estimate_forward(x)
        top = logits.argmax(dim=1)
        gaps = logits.gather(1, top.unsqueeze(1)) - logits
        k_ji = est.lipschitz * est.distances.index_select(0, top)
        ratio = torch.where(k_ji > 0, gaps / k_ji, torch.where(gaps > 0, math.inf, 0.0))
        own = torch.nn.functional.one_hot(top, self.num_classes).bool()
        ratio = ratio.masked_fill(own, math.inf)
        radius = ratio.min(dim=1).values.clamp_min(0.0)
        ok = torch.isfinite(logits).all(dim=1)  # a non-finite input is never certified
        if same is not None:
            ok = ok & same
        return torch.where(ok, radius, torch.zeros_like(radius))

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, bound={self.bound!r}, input_shape={self.input_shape}"
