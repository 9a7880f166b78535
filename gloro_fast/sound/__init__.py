"""Provable (sound) Lipschitz bounds and rounding-error bounds, computed in float64 from
the weights alone, with every rounding on the safe side.

- :mod:`.rounding`: unit roundoffs, γ_n, upward rounding;
- :mod:`.psd`: a Cholesky certificate for λ_max of symmetric matrices;
- :mod:`.dense`: ‖W‖₂ and ‖|W|‖₂ of dense matrices;
- :mod:`.conv`: the operator norm of zero-padded strided/dilated/grouped convolutions and
  LiResNet blocks (circular embedding, explicit Gram on small operators);
- :mod:`.forward_error`: a-priori bounds on a forward pass's rounding error.

The derivations are in each module's docstring and in ``docs/soundness.md``.
"""
from .conv import conv_abs_norm_upper, conv_norm_upper
from .dense import abs_norm_upper, spectral_norm_upper
from .forward_error import Affine, Arithmetic, ForwardBound, ieee_arithmetic
from .psd import lambda_max_upper

__all__ = [
    "Affine",
    "Arithmetic",
    "ForwardBound",
    "abs_norm_upper",
    "conv_abs_norm_upper",
    "conv_norm_upper",
    "ieee_arithmetic",
    "lambda_max_upper",
    "spectral_norm_upper",
]
