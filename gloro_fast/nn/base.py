"""Base classes of the Lipschitz-bounded layers.

A :class:`LipschitzModule` knows an upper bound (or, for power-iterated layers, a
converging estimate from below) of its l2 Lipschitz constant. Layers whose bound is
estimated by power iteration derive from :class:`PowerIterationModule`, which keeps the
iterate u as a buffer named ``power_iterate``: saved in ``state_dict``, moved by
``.to()``, and for DDP identical across ranks because buffers are broadcast.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import nn

__all__ = ["LipschitzModule", "PowerIterationModule"]

Bound = Union[torch.Tensor, float]


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




class PowerIterationModule(LipschitzModule):
    """A layer whose bound is σ̂ of a linear operator, estimated by power iteration.

    Subclasses implement ``_iterate_shape()`` (None while unknown) and
    ``_power_step(n_iter) -> (u_new, sigma)``.
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

    @property
    def iterate_initialized(self) -> bool:
        return self.power_iterate.numel() > 0

    def _power_step(self, n_iter: int):
        raise NotImplementedError

    def lipschitz_bound(self, n_iter: int = 0) -> torch.Tensor:
        if not self.iterate_initialized:
            raise RuntimeError(
                f"{type(self).__name__}: its input size is unknown, so its operator norm is "
                "undefined; pass input_shape= to the layer (or to GloroNet) or run a forward "
                "pass first"
            )
        u, sigma = self._power_step(n_iter)
        if n_iter > 0:
            with torch.no_grad():
                self.power_iterate.copy_(u)
        return sigma

    @torch.no_grad()
    def converge(self, tol: float = 1e-6, max_iter: int = 1000, check_every: int = 8):
        """Iterate until the relative change of σ̂ over one iteration is ≤ ``tol``, or
        ``max_iter`` iterations have run.

        The change is measured on the last iteration of every ``check_every`` (one host
        synchronisation per block rather than per iteration); stopping later than needed
        only converges further. Returns ``(sigma, converged, iterations)``; the iterate
        buffer is updated.
        """
        sigma = self.lipschitz_bound(0)
        done = 0
        while done < max_iter:
            block = min(check_every, max_iter - done)
            if block > 1:
                sigma = self.lipschitz_bound(block - 1)
            new = self.lipschitz_bound(1)
            done += block
            if abs(float(new) - float(sigma)) <= tol * abs(float(new)):
                return new, True, done
            sigma = new
        return sigma, False, max_iter

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # A layer that has not seen its input size yet adopts the saved iterate's shape.
        key = prefix + "power_iterate"
        if key in state_dict and not self.iterate_initialized:
            saved = state_dict[key]
            self.power_iterate = torch.empty(
                saved.shape, device=self.power_iterate.device, dtype=self.power_iterate.dtype
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
