"""Argument checks shared by ops, layers and the model.

Every public entry point validates its inputs with these helpers so that bad input
fails early with a message naming the argument and what was expected, never deep
inside a kernel or, worse, with a silently wrong certificate.

Checks of a tensor's type, shape, dtype and device read only metadata and always run.
Checks of its *values* (finite entries, labels in range, K ≥ 0) read the data on the
host — a synchronisation, a pipeline stall on a GPU and no CUDA-graph capture — so they
run only in debug mode (:func:`set_debug`, or ``GLORO_FAST_DEBUG=1``). Without them the
results stay safe: a non-finite input or bound is never certified, and out-of-range
classes give NaN ⊥ logits.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "BOUNDS",
    "check_tensor",
    "check_finite",
    "check_epsilon",
    "check_labels",
    "check_positive_int",
    "check_choice",
    "check_input_shape",
    "check_batch_shape",
    "debug_enabled",
    "set_debug",
]

# GloroNet's ⊥-logit bound: "margin" (K · ‖w_j − w_i‖ per class pair) or "global" (one K)
BOUNDS = ("margin", "global")

_DEBUG = {"on": None}  # None: read GLORO_FAST_DEBUG when first needed (never at import)


def set_debug(on: Optional[bool]) -> None:
    """Turn the value checks (NaN/Inf inputs, label ranges, K ≥ 0) on or off for every
    gloro_fast call; ``None`` returns to ``GLORO_FAST_DEBUG`` (off unless set to 1)."""
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"on must be a bool or None, got {type(on).__name__}")
    _DEBUG["on"] = on


def debug_enabled() -> bool:
    """Whether value checks run (:func:`set_debug`, else ``GLORO_FAST_DEBUG``)."""
    if _DEBUG["on"] is None:
        value = os.environ.get("GLORO_FAST_DEBUG", "0").strip().lower()
        return value not in ("", "0", "false", "no", "off")
    return _DEBUG["on"]


def value_checks() -> bool:
    """Run the checks that read tensor values: in debug mode, outside torch.compile tracing
    and CUDA-graph capture."""
    return debug_enabled() and not _is_compiling()


def _is_compiling() -> bool:
    """True while torch.compile traces or a CUDA graph is captured: value checks read the
    data on the host, which neither allows (a capture would fail on the synchronisation)."""
    return torch.compiler.is_compiling() or capturing_cuda_graph()


def capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is capturing a graph (False before CUDA is initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    floating: bool = False,
    dtype: Optional[torch.dtype] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected rank, dtype kind and shape.

    ``shape`` entries that are ``None`` match any size.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if shape is not None:
        if value.dim() != len(shape) or any(
            s is not None and s != v for s, v in zip(shape, value.shape)
        ):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Reject NaN/Inf entries (debug mode only: see the module docstring)."""
    if value_checks() and value.numel() > 0 and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return value


def check_epsilon(epsilon, name: str = "epsilon") -> float:
    """ε must be a finite, non-negative real number."""
    if isinstance(epsilon, torch.Tensor):
        if epsilon.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(epsilon.shape)}")
        epsilon = epsilon.item()
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(epsilon).__name__}")
    epsilon = float(epsilon)
    if not 0 <= epsilon < math.inf:  # also NaN; comparisons, so that torch.compile can trace it
        raise ValueError(f"{name} must be finite and >= 0, got {epsilon}")
    return epsilon


def check_labels(name: str, labels, batch: int, num_classes: int, device=None) -> torch.Tensor:
    """Labels: an integer tensor of shape (batch,) with values in [0, num_classes) (the
    range in debug mode only)."""
    check_tensor(name, labels, ndim=1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    if device is not None and labels.device != torch.device(device):
        raise ValueError(f"{name} must be on device {device}, got {labels.device}")
    if value_checks() and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must be in [0, {num_classes}), got values in [{lo}, {hi}]"
            )
    return labels.long()


def check_choice(name: str, value, choices):
    """``value`` must be one of ``choices`` (named in the message as given)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_input_shape(input_shape, *, ndim: Optional[int] = None, channels: Optional[int] = None,
                      name: str = "input_shape") -> Tuple[int, ...]:
    """The shape of one input sample (no batch axis) as a tuple of ints: at least one size,
    every size >= 1; ``ndim`` sizes and ``channels`` first where given."""
    shape = tuple(int(s) for s in input_shape)
    if (not shape or min(shape) < 1 or (ndim is not None and len(shape) != ndim)
            or (channels is not None and shape[0] != channels)):
        if ndim == 3:
            form = f"({'C' if channels is None else channels}, H, W) with positive sizes"
        else:
            form = "a tuple of positive ints" if ndim is None else f"{ndim} positive ints"
        raise ValueError(f"{name} must be {form}, got {input_shape}")
    return shape


def check_batch_shape(name: str, x: torch.Tensor, input_shape: Tuple[int, ...]) -> torch.Tensor:
    """``x`` must be a batch (B, *input_shape) of samples of the given shape."""
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    return x


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value
