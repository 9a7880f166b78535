"""Base classes of the Lipschitz-bounded layers.

A :class:`LipschitzModule` knows its l2 Lipschitz constant in three ways:

- ``lipschitz_bound(n_iter)`` / ``lipschitz_estimate()``: the differentiable value
  training uses (σ̂ by power iteration for linear operators, the exact constant otherwise);
- ``lipschitz_upper_bound()``: a *provable* upper bound computed from the weights alone
  (float64, rounding accounted for; :mod:`gloro_fast.sound`), used by sound certificates;
- ``lipschitz_lower_bound()``: a provable lower bound (for power-iterated layers
  ‖Au‖/‖u‖ ≤ ‖A‖ for the current iterate u), so that [lower, upper] brackets the norm;

and ``forward_bound(bound, arith, upper_of)`` propagates the a-priori bounds on the
activation norm and the forward pass's rounding error through the layer
(:mod:`gloro_fast.sound.forward_error`). A custom layer must implement the last three to
be certified with ``certificate="sound"``; nothing is ever assumed 1-Lipschitz.

Layers whose bound is estimated by power iteration derive from
:class:`PowerIterationModule`, which keeps the iterate u as a buffer named
``power_iterate``: saved in ``state_dict``, moved by ``.to()``, and for DDP identical
across ranks because buffers are broadcast. An iterate read from a file is never trusted:
one that is zero or not finite is replaced before use.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .._validation import check_choice
from ..sound.forward_error import Arithmetic, ForwardBound, NormBound
from ..sound.rounding import U64, down, gamma, up

__all__ = ["LipschitzModule", "PowerIterationModule", "ConstantLipschitzModule", "Convergence", "WeightInit"]

Bound = Union[torch.Tensor, float]
UpperOf = Callable[["LipschitzModule"], float]


class WeightInit:
    """Mixin (listed before the torch layer) of the layers that take ``init=``:
    ``"orthogonal"`` (the default) initialises the weight orthogonally and the bias to 0,
    ``"default"`` keeps torch's Kaiming-uniform initialisation."""

    INITS = ("orthogonal", "default")
    init: str = "orthogonal"

    def _set_init(self, init: str) -> None:
        """Call before the torch layer's ``__init__`` (which calls ``reset_parameters``)."""
        self.init = check_choice("init", init, self.INITS)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.init == "orthogonal":
            nn.init.orthogonal_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)


def float64_scalar(value: float) -> torch.Tensor:
    """A 0-dim float64 CPU tensor (the type of every provable bound)."""
    return torch.tensor(float(value), dtype=torch.float64)


class LipschitzModule(nn.Module):
    """An ``nn.Module`` with a known bound on its l2 Lipschitz constant."""

    def lipschitz_bound(self, n_iter: int = 0) -> Bound:
        """Lipschitz bound of this layer, differentiable w.r.t. its weights.

        ``n_iter`` more power iterations are run first (and the iterate updated) by
        layers that estimate their norm; constant-bound layers ignore it.
        """
        raise NotImplementedError

    def lipschitz_estimate(self) -> Bound:
        """σ̂ with the current iterate (no iteration), differentiable w.r.t. weights."""
        return self.lipschitz_bound(0)

    def lipschitz_upper_bound(self) -> torch.Tensor:
        """Provable upper bound of the Lipschitz constant, from the weights alone: a 0-dim
        float64 tensor (+inf when it cannot be bounded, e.g. non-finite weights)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no provable Lipschitz upper bound; implement "
            "lipschitz_upper_bound(), lipschitz_lower_bound() and forward_bound() to certify "
            "with certificate='sound', or use certificate='estimate'"
        )

    def lipschitz_lower_bound(self) -> torch.Tensor:
        """Provable lower bound of the Lipschitz constant (0-dim float64)."""
        raise NotImplementedError(f"{type(self).__name__} has no Lipschitz lower bound")

    def certifying_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation the certifying pass (``GloroNet.sound_forward``) runs: the same map
        as ``forward``, computed in the way whose rounding ``forward_bound``'s per-sample
        step describes (by default ``forward`` itself)."""
        return self(x)

    def certifying_forward_norm(self, x: torch.Tensor, norm: Optional[NormBound]):
        """``(certifying_forward(x), bound)``: ``bound`` ≥ each output sample's l2 norm when
        this layer knows one without reading its output again, else None. A bound is a (B,)
        float64 tensor or a :class:`~gloro_fast.sound.forward_error.SumOfSquares` (taken
        with the others at the end of the pass, :meth:`~gloro_fast.bounds.SoundBounds.per_sample_basis`).
        ``norm`` is such a bound for x, or None. By default None (the certifying pass then
        measures the norm where it needs it); norm-preserving or norm-reducing layers pass
        ``norm`` on as it is, and MinMax computes it while it writes (:func:`gloro_fast.ops.minmax_norm`)."""
        return self.certifying_forward(x), None

    def forward_bound(self, bound: ForwardBound, arith: Arithmetic, upper_of: UpperOf) -> ForwardBound:
        """Propagate the a-priori activation-norm and rounding-error bounds through this
        layer (``upper_of(layer)`` returns a layer's cached upper bound as a float)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not bound the rounding of its forward pass; implement "
            "forward_bound() to certify with certificate='sound'"
        )


class ConstantLipschitzModule(LipschitzModule):
    """A layer whose Lipschitz constant is a known number (its lower and upper bound), and
    that is evaluated exactly in floating point with L(0) = 0 when the constant is 1
    (ReLU, MinMax, max-pooling, reshapes)."""

    lipschitz_constant_value = 1.0

    def lipschitz_bound(self, n_iter: int = 0) -> float:
        return self.lipschitz_constant_value

    def lipschitz_upper_bound(self) -> torch.Tensor:
        return float64_scalar(up(self.lipschitz_constant_value))

    def lipschitz_lower_bound(self) -> torch.Tensor:
        return float64_scalar(down(self.lipschitz_constant_value))

    def output_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        """Shape of one output sample for one input sample of ``shape`` (no batch axis)."""
        with torch.no_grad():
            out = self(torch.empty((2,) + tuple(shape), device="meta"))
        if out.dim() == 0 or out.shape[0] != 2:
            raise ValueError(f"{type(self).__name__} mixes the samples of a batch: no per-sample bound")
        return tuple(out.shape[1:])

    def forward_bound(self, bound: ForwardBound, arith: Arithmetic, upper_of: UpperOf) -> ForwardBound:
        from ..sound.forward_error import exact_layer

        if self.lipschitz_constant_value != 1.0:
            # exact_layer passes K through: right for a 1-Lipschitz exact layer only
            raise NotImplementedError(
                f"{type(self).__name__} has the Lipschitz constant {self.lipschitz_constant_value}, not 1: "
                "it must implement forward_bound() (how its constant and its rounding enter the bound)"
            )
        return exact_layer(bound, self.output_shape(bound.shape))


class Convergence(NamedTuple):
    """The outcome of :meth:`PowerIterationModule.converge`.

    estimate: σ̂ (0-dim, the layer's dtype and device) with the final iterate;
    lower, upper: the provable bracket lower ≤ ‖A‖ ≤ upper (0-dim float64);
    iterations: power iterations run; status: ``"closed"`` (upper/estimate − 1 ≤ tol),
    ``"stalled"`` (the estimate changed by ≤ tol over the last iteration while the bracket
    stayed open: what is left is the upper bound's own gap or a very slow iteration) or
    ``"max_iter"``.
    """

    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    iterations: int
    status: str


class PowerIterationModule(LipschitzModule):
    """A layer whose bound is σ̂ of a linear operator, estimated by power iteration.

    Subclasses implement ``_iterate_shape()`` (None while unknown),
    ``_power_step(n_iter, u) -> (u_new, sigma)`` (from the iterate ``u``) and ``_apply_float64(u) -> (Au, err)``
    (A applied to a float64 CPU vector with a bound on the rounding error of the result).
    """

    power_iterate: torch.Tensor

    def _init_iterate(self, shape, device=None, dtype=None) -> None:
        if shape is None:
            u = torch.empty(0, device=device, dtype=dtype)
        else:
            u = torch.randn(shape, device=device, dtype=dtype)
            u = u / torch.linalg.vector_norm(u)
        if "power_iterate" in self._buffers:
            self.power_iterate = u
        else:
            self.register_buffer("power_iterate", u)
        self._set_fallback()

    def _set_fallback(self) -> None:
        """A fixed unit vector of the iterate's shape (seeded, so runs stay reproducible) that
        replaces a zero or non-finite iterate: a non-persistent buffer, so that ``.to()``
        moves it and nothing is generated inside a training step or a compiled graph."""
        ref = self.power_iterate
        gen = torch.Generator(device="cpu").manual_seed(0x9E3779B9)
        u = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        if u.numel():
            u = u / torch.linalg.vector_norm(u)
        u = u.to(device=ref.device, dtype=ref.dtype)
        if "_iterate_fallback" in self._buffers:
            self._iterate_fallback = u
        else:
            self.register_buffer("_iterate_fallback", u, persistent=False)

    @property
    def iterate_initialized(self) -> bool:
        return self.power_iterate.numel() > 0

    def _fallback_iterate(self) -> torch.Tensor:
        if self._iterate_fallback.shape != self.power_iterate.shape:  # the iterate was reshaped
            self._set_fallback()
        return self._iterate_fallback

    def _own_write(self):
        """(storage pointer, version counter) of the stored iterate: what it was when this
        layer last wrote it."""
        return self.power_iterate.data_ptr(), self.power_iterate._version

    def _checked_iterate(self) -> torch.Tensor:
        """The stored iterate, or a fixed unit vector where it is zero or not finite (e.g.
        from a forged checkpoint): a where() on a 0-dim condition, no host synchronisation.
        Skipped, eagerly, while the iterate is the one this layer wrote itself (same storage
        and version counter: finite and non-zero by construction; loading a state dict, a
        DDP broadcast, ``.to()`` or any in-place edit changes one of them)."""
        u = self.power_iterate.detach()
        if not torch.compiler.is_compiling() and self.__dict__.get("_written") == self._own_write():
            return u
        norm = torch.linalg.vector_norm(u)
        bad = ~(torch.isfinite(norm) & (norm > 0))
        return torch.where(bad, self._fallback_iterate(), u)

    def _power_step(self, n_iter: int, u: torch.Tensor):
        raise NotImplementedError

    def _apply_float64(self, u: torch.Tensor):
        raise NotImplementedError

    def _require_iterate(self) -> None:
        if not self.iterate_initialized:
            raise RuntimeError(
                f"{type(self).__name__}: its input size is unknown, so its operator norm is "
                "undefined; pass input_shape= to the layer (or to GloroNet) or run a forward "
                "pass first"
            )

    def lipschitz_bound(self, n_iter: int = 0) -> torch.Tensor:
        self._require_iterate()
        u, sigma = self._power_step(n_iter, self._checked_iterate())
        if n_iter > 0:
            with torch.no_grad():
                self.power_iterate.copy_(u)
            if not torch.compiler.is_compiling():
                self.__dict__["_written"] = self._own_write()
        return sigma

    @torch.no_grad()
    def lipschitz_lower_bound(self, iterate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖Au‖/‖u‖ ≤ ‖A‖ for u = ``iterate`` (default: the stored one), computed in float64
        on the CPU and rounded down (the rounding of Au is subtracted); 0 for a zero or
        non-finite u."""
        self._require_iterate()
        u = self.power_iterate if iterate is None else iterate
        u = u.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(u).all()):
            return float64_scalar(0.0)
        unorm = float(torch.linalg.vector_norm(u))
        if unorm == 0.0:
            return float64_scalar(0.0)
        out, err = self._apply_float64(u)
        onorm = float(torch.linalg.vector_norm(out))
        if not math.isfinite(onorm):
            return float64_scalar(0.0)
        slack = gamma(max(out.numel(), u.numel()), U64)
        num = down(down(onorm * (1.0 - slack)) - err)
        return float64_scalar(down(num / up(unorm * (1.0 + slack))) if num > 0 else 0.0)

    @torch.no_grad()
    def converge(self, tol: float = 1e-6, max_iter: int = 1000, check_every: int = 8,
                 upper=None, update: bool = True) -> Convergence:
        """Power-iterate until the bracket closes (upper/σ̂ − 1 ≤ ``tol``), the estimate
        stalls (relative change over one iteration ≤ ``tol``, checked on the last iteration
        of every ``check_every``) or ``max_iter`` iterations have run; see
        :class:`Convergence`. ``upper`` (a provable upper bound, computed if None) only
        decides when to stop. The iterate buffer receives the final iterate if ``update``
        (else the layer is left untouched, so concurrent callers cannot interfere)."""
        self._require_iterate()
        upper = float(self.lipschitz_upper_bound() if upper is None else upper)
        done, status = 0, "max_iter"
        u, sigma = self._power_step(0, self._checked_iterate())
        while done < max_iter:
            # at least one iteration first: it normalises the iterate, whatever was stored
            block = min(check_every, max_iter - done)
            if block > 1:
                u, sigma = self._power_step(block - 1, u)
            u, new = self._power_step(1, u)
            done += block
            change = abs(float(new) - float(sigma))
            sigma = new
            s = float(sigma)
            if math.isfinite(upper) and 0 < s <= upper and upper / s - 1.0 <= tol:
                status = "closed"
                break
            if change <= tol * abs(s):
                status = "stalled"
                break
        if update:
            self.power_iterate.copy_(u)
        return Convergence(sigma.detach(), self.lipschitz_lower_bound(u), float64_scalar(upper), done, status)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # A layer that has not seen its input size yet adopts the saved iterate's shape.
        key = prefix + "power_iterate"
        if key in state_dict and not self.iterate_initialized:
            saved = state_dict[key]
            self.power_iterate = torch.empty(
                saved.shape, device=self.power_iterate.device, dtype=self.power_iterate.dtype
            )
            self._set_fallback()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
