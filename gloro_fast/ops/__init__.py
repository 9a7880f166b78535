"""The gloro_fast ops: one public function per op, validated and dispatched by backend.

See docs/architecture.md for the op contract. Layers and :class:`gloro_fast.GloroNet` call
only these functions, so faster backends slot in behind the same names. Each op is one
``torch.library`` op (``torch.ops.gloro_fast.<op>``) whose kernels come from the backend
table (:mod:`gloro_fast.ops.registry`); :func:`use_backend` / :func:`set_backend` pick the
backend.
"""
from ._backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from .blocked_linear import blocked_linear, blocked_linear_reference
from .bottom_logit import bottom_logit, bottom_logit_reference
from .class_distances import class_distances, class_distances_reference
from .minmax_norm import minmax_norm, minmax_norm_, minmax_norm_reference
from .norm_basis import norm_basis, norm_basis_reference
from .power_iteration_conv import (
    power_iteration_conv,
    power_iteration_conv_batched,
    power_iteration_conv_reference,
)
from .power_iteration_linear import power_iteration_linear, power_iteration_linear_reference
from .same_bits import same_bits, same_bits_reference
from .sound_decision import sound_decision, sound_decision_reference

__all__ = [
    "BACKENDS",
    "blocked_linear",
    "blocked_linear_reference",
    "bottom_logit",
    "bottom_logit_reference",
    "class_distances",
    "class_distances_reference",
    "get_backend",
    "minmax_norm",
    "minmax_norm_",
    "minmax_norm_reference",
    "norm_basis",
    "norm_basis_reference",
    "power_iteration_conv",
    "power_iteration_conv_batched",
    "power_iteration_conv_reference",
    "power_iteration_linear",
    "power_iteration_linear_reference",
    "resolve_backend",
    "same_bits",
    "same_bits_reference",
    "sound_decision",
    "sound_decision_reference",
    "set_backend",
    "use_backend",
]
