"""``class_distances(W)``: pairwise l2 distances between the rows of the head weight.

D ∈ R^{C×C}, D_ji = ‖w_j − w_i‖₂ for W ∈ R^{C×d}. With the body's Lipschitz bound K,
K·D_ji bounds the Lipschitz constant of the margin f_j − f_i (DESIGN.md, "margin").

Backward: ∂D_ji/∂w_j = (w_j − w_i)/D_ji, taken as 0 where D_ji = 0 (the diagonal).

Backends: ``reference`` (below) and ``cpp``: the compiled custom ops
``torch.ops.gloro_fast.class_distances`` / ``class_distances_backward`` (csrc/cpu, csrc/cuda),
made differentiable and traceable here with ``register_autograd`` and ``register_fake``.
"""
from __future__ import annotations

import torch

from .._validation import check_finite, check_tensor
from ._backend import resolve_backend
from ._extension import extension_loaded

__all__ = ["class_distances", "class_distances_reference"]


def class_distances_reference(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Reference: ``torch.cdist`` of the rows with themselves.

    ``exact=True`` takes direct differences (no cancellation, for certification);
    otherwise the Gram form ‖w_j‖² + ‖w_i‖² − 2 w_j·w_i (one GEMM) may be used.
    Neither materialises a C×C×d tensor.
    """
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    dist = torch.cdist(weight.unsqueeze(0), weight.unsqueeze(0), compute_mode=mode)[0]
    # The Gram form can leave tiny non-zeros on the diagonal; D_jj is exactly 0.
    eye = torch.eye(weight.shape[0], dtype=torch.bool, device=weight.device)
    return dist.masked_fill(eye, 0.0)


def class_distances(weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Pairwise row distances of ``weight`` (C, d) → (C, C), differentiable.

    Args:
        weight: head weight, floating point, shape (C, d), C ≥ 1, d ≥ 1.
        exact: use direct differences instead of the Gram form (slower, no cancellation).
    """
    check_tensor("weight", weight, ndim=2, floating=True)
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (C, d) with C, d >= 1, got {tuple(weight.shape)}")
    check_finite("weight", weight)
    backend = _resolve(weight.device.type)
    if backend == "reference":
        return class_distances_reference(weight, exact=exact)
    if backend == "cpp":
        return torch.ops.gloro_fast.class_distances(weight, bool(exact))
    if backend == "triton":
        from ..kernels import class_distances as triton_kernels

        return triton_kernels.class_distances(weight, bool(exact))
    raise RuntimeError(f"unknown backend {backend!r}")  # pragma: no cover - guarded by set_backend


@torch.compiler.assume_constant_result
def _resolve(device_type: str) -> str:
    """The backend for this op on ``device_type``. Under torch.compile the answer is taken
    as a constant of the traced graph (the kernel lookup itself cannot be traced; changing
    the backend afterwards takes effect on the next compilation)."""
    return resolve_backend(torch.device(device_type), op="class_distances")


# ---- registration of the compiled ops (only when gloro_fast._C loaded, only once) ----

_OP = "gloro_fast::class_distances"
_OP_BACKWARD = "gloro_fast::class_distances_backward"


def _fake_class_distances(weight, exact):
    c = weight.shape[0]
    return weight.new_empty((c, c))


def _fake_class_distances_backward(grad, weight, distances):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    weight, _exact = inputs
    ctx.save_for_backward(weight, output)


def _backward(ctx, grad):
    weight, distances = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_weight = torch.ops.gloro_fast.class_distances_backward(grad, weight, distances)
    return grad_weight, None


def _already_registered(qualname: str) -> bool:
    try:  # survives importlib.reload of this module
        from torch._library.simple_registry import singleton

        return singleton.find(qualname).fake_impl.kernel is not None
    except Exception:  # pragma: no cover - private API moved
        return False


def _register() -> bool:
    if _state["registered"] or _already_registered(_OP):
        _state["registered"] = True
        return True
    torch.library.register_fake(_OP)(_fake_class_distances)
    torch.library.register_fake(_OP_BACKWARD)(_fake_class_distances_backward)
    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
    _state["registered"] = True
    return True


_state = {"registered": False}
if extension_loaded():
    _register()
