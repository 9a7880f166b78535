"""GloroNet: a Lipschitz-bounded body and a linear head, with the ⊥ logit appended.

Logits f = W h(x) + b with ‖h‖_Lip ≤ K. With j = argmax f (lowest index on ties):

    margin bound (default):  K_ji = K · ‖w_j − w_i‖₂
    global bound:            K_ji = √2 · K · ‖W‖₂           (i ≠ j)
    f_⊥ = max_{i≠j} (f_i + ε K_ji)

x is certified at radius ε iff f_j − f_i > ε K_ji for every i ≠ j, i.e. iff f_j > f_⊥;
its certified radius is max(0, min_{i≠j} (f_j − f_i) / K_ji).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ._validation import check_epsilon, check_finite, check_positive_int, check_tensor
from .nn import Linear, LipschitzModule, PowerIterationModule, from_torch
from .ops import bottom_logit, class_distances

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
        tol, max_iter: convergence of the bounds used by eval, ``certify`` and
            ``certified_radius`` (relative change of σ̂ ≤ tol; warns if max_iter is hit).

    In training mode every forward advances the power iteration by ``n_iter`` steps and
    uses σ̂ with autograd. In eval mode, and always in ``certify``/``certified_radius``/
    ``lipschitz_constant``, the bounds are iterated to convergence and cached until any
    parameter changes (in place or replaced), so a stale bound cannot be used.
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
        if bound not in ("margin", "global"):
            raise ValueError(f"bound must be 'margin' or 'global', got {bound!r}")
        self.bound = bound
        self.n_iter = check_positive_int("n_iter", n_iter, allow_zero=True)
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        self.tol = float(tol)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self._cache = None
        self.input_shape = None
        if input_shape is not None:
            self.input_shape = tuple(int(s) for s in input_shape)
            if not self.input_shape or min(self.input_shape) < 1:
                raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape}")
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

    # -- bounds ---------------------------------------------------------------------
    def _power_layers(self):
        layers = [m for m in self.body.modules() if isinstance(m, PowerIterationModule)]
        if self.bound == "global":
            layers.append(self.head)
        return layers

    def _weights_key(self):
        return tuple(
            (p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)) for p in self.parameters()
        ) + (self.bound,)

    def _as_tensor(self, value) -> torch.Tensor:
        ref = self.head.weight
        if isinstance(value, torch.Tensor):
            return value.to(dtype=ref.dtype)
        return torch.tensor(float(value), dtype=ref.dtype, device=ref.device)

    def _global_distances(self, sigma_head: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        off = 1.0 - torch.eye(c, dtype=self.head.weight.dtype, device=self.head.weight.device)
        return (math.sqrt(2.0) * sigma_head) * off

    def _training_bounds(self):
        lipschitz = self._as_tensor(self.body.lipschitz_bound(self.n_iter))
        if self.bound == "margin":
            distances = class_distances(self.head.weight)
        else:
            distances = self._global_distances(self.head.lipschitz_bound(self.n_iter))
        return lipschitz, distances

    @torch.no_grad()
    def _converged_bounds(self):
        key = self._weights_key()
        # The version counters miss in-place edits through ``p.data`` (a separate counter),
        # so the cache also holds a copy of the weights and checks their values.
        params = [p.detach() for p in self.parameters()]
        if (self._cache is not None and self._cache[0] == key
                and all(torch.equal(a, b) for a, b in zip(self._cache[3], params))):
            return self._cache[1], self._cache[2]
        for layer in self._power_layers():
            if not layer.iterate_initialized:
                raise RuntimeError(
                    "the model's input size is unknown: pass input_shape= to GloroNet or run a "
                    "forward pass before asking for its bounds"
                )
            _, converged, steps = layer.converge(self.tol, self.max_iter)
            if not converged:
                warnings.warn(
                    f"power iteration of {type(layer).__name__} did not reach tol={self.tol} in "
                    f"{self.max_iter} iterations; its σ̂ may underestimate the norm",
                    RuntimeWarning,
                    stacklevel=3,
                )
        lipschitz = self._as_tensor(self.body.lipschitz_bound(0)).detach()
        if self.bound == "margin":
            distances = class_distances(self.head.weight, exact=True).detach()
        else:
            distances = self._global_distances(self.head.lipschitz_bound(0)).detach()
        # the iterate buffers changed but no parameter did, so the key still holds
        self._cache = (key, lipschitz, distances, [p.clone() for p in params])
        return lipschitz, distances

    def lipschitz_constant(self) -> torch.Tensor:
        """K: the body's Lipschitz bound, power iterations converged (0-dim, detached)."""
        return self._converged_bounds()[0]

    def margin_lipschitz(self) -> torch.Tensor:
        """K_ji (C, C), converged (detached); K_jj = 0."""
        lipschitz, distances = self._converged_bounds()
        return lipschitz * distances

    # -- forward ----------------------------------------------------------------------
    def _check_input(self, x) -> None:
        check_tensor("x", x, min_ndim=2, floating=True)
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        ref = self.head.weight
        if x.device != ref.device:
            raise ValueError(f"x must be on the model's device {ref.device}, got {x.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"x must have the model's dtype {ref.dtype}, got {x.dtype}")
        check_finite("x", x)

    def forward_parts(self, x: torch.Tensor, converged: Optional[bool] = None) -> GloroOutput:
        """The GloRo forward with its pieces: see :class:`GloroOutput`.

        ``converged`` (default: ``not self.training``) selects converged, cached bounds
        instead of the training-mode σ̂ with autograd.
        """
        self._check_input(x)
        logits = self.head(self.body(x))
        if self.input_shape is None:  # learnt at the first forward: later inputs must match
            self.input_shape = tuple(x.shape[1:])
        if converged is None:
            converged = not self.training
        lipschitz, distances = self._converged_bounds() if converged else self._training_bounds()
        bottom, _ = bottom_logit(logits, distances, lipschitz, self.epsilon)
        return GloroOutput(logits, bottom, lipschitz, distances)

    def forward(self, x: torch.Tensor, parts: bool = False):
        """(B, C + 1) logits [f, f_⊥]; with ``parts=True`` the :class:`GloroOutput` (so that
        wrappers that hook ``forward``, such as DistributedDataParallel, see the full step)."""
        out = self.forward_parts(x)
        return out if parts else out.augmented

    # -- certification --------------------------------------------------------------
    @torch.no_grad()
    def certify(self, x: torch.Tensor) -> torch.Tensor:
        """Certified predictions (B,) int64 in [0, C]: the class j where f_j − f_i > ε K_ji
        for every i ≠ j, else C (⊥). Uses converged bounds."""
        out = self.forward_parts(x, converged=True)
        top = out.logits.argmax(dim=1)
        certified = out.logits.gather(1, top.unsqueeze(1)).squeeze(1) > out.bottom
        return torch.where(certified, top, torch.full_like(top, self.num_classes))

    @torch.no_grad()
    def certified_radius(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) = max(0, min_{i≠j} (f_j − f_i) / K_ji), shape (B,), with converged bounds.
        A pair with K_ji = 0 never limits the radius unless f_i = f_j."""
        self._check_input(x)
        logits = self.head(self.body(x))
        if self.input_shape is None:  # learnt at the first forward: later inputs must match
            self.input_shape = tuple(x.shape[1:])
        lipschitz, distances = self._converged_bounds()
        top = logits.argmax(dim=1)
        gaps = logits.gather(1, top.unsqueeze(1)) - logits
        k_ji = lipschitz * distances.index_select(0, top)
        ratio = torch.where(k_ji > 0, gaps / k_ji, torch.where(gaps > 0, math.inf, 0.0))
        own = torch.nn.functional.one_hot(top, self.num_classes).bool()
        ratio = ratio.masked_fill(own, math.inf)
        return ratio.min(dim=1).values.clamp_min(0.0)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, bound={self.bound!r}, input_shape={self.input_shape}"
