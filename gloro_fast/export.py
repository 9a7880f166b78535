"""Freeze a :class:`~gloro_fast.GloroNet` into a plain ``torch.nn.Module`` and export it.

``freeze(model)`` copies the network into ``torch.nn`` layers (``Conv2d`` with its zero
padding folded in where it is symmetric, ``Linear``, ``ReLU``, ``Flatten``, the pools, and
two tiny modules of this file: :class:`MinMax` and :class:`Residual` for LiResNet blocks)
and computes once everything its certificate needs: K, the class distances D_ji and
K_ji = K·D_ji, and, for the sound certificate, the constants of the per-sample rounding
allowance. The result, :class:`FrozenGloroNet`, runs no power iteration and no custom op,
and takes the same decisions as the live model:

- ``certificate="sound"`` (default): the sound test of :mod:`gloro_fast.bounds`, operation
  for operation — the activation norms recorded at each affine layer
  (:func:`~gloro_fast.sound.forward_error.activation_norm_upper`), the allowance
  (``SoundBounds.allowance``), f_⊥ and the decision (``SoundBounds.bottom``) and the radius
  (``SoundBounds.radius``), in float64 with the same roundings;
- ``certificate="estimate"``: the GloRo paper's test with the converged power iteration's K.

:func:`export_pt2` (``torch.export``, a ``.pt2`` file) and :func:`export_onnx` (torch's ONNX
exporter) write programs with a dynamic batch dimension whose three outputs are the
``(B, C+1)`` logits [f, f_⊥], the certified predictions (``(B,)`` int64, C for ⊥) and the
certified radii (``(B,)``); loading and running them needs torch alone (``.pt2``) or ONNX
Runtime alone (``.onnx``), never gloro_fast.

Every number the float64 computations use is a float64 *tensor* (a buffer), never a Python
number: torch's ONNX exporter writes Python-number operands as float32 constants, which
would turn the upward rounding x·(1 + 2⁻⁵⁰) + 2⁻¹⁰⁷⁴ into x·1 + 0 and round every bound to
float32, possibly down. Each enters the arithmetic expanded to the batch's shape
(:func:`_spread`), so that no graph optimiser can fold it away; tests/test_export.py checks
that ONNX Runtime, at its highest optimisation level, reproduces the float64 decision
computations bit for bit.

Soundness of a frozen or exported program rests on the assumptions of
``docs/soundness.md``: IEEE arithmetic in the model's dtype, classical (any-order) summation
in the layers, no TF32 or other reduced-precision modes, and IEEE float64 arithmetic for
the certificate's own computations. The Python module switches TF32 and autocast off while
it runs, as the live model does; a runtime executing an exported program must do the same
(ONNX Runtime's CPU provider does; its CUDA provider needs ``use_tf32=0``).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import nn as gnn
from ._validation import check_batch_shape, check_epsilon
from .bounds import check_certificate, inferred_input_shape, is_chain, named_layers
from .files import atomic_write, atomic_write_bytes
from .gloro_net import GloroNet
from .nn.conv import channels_last
from .nn.linear import certifying_blocks
from .ops.blocked_linear import blocked_linear_reference
from .sound.decision import ROUNDING, Allowance, LinearForms, decide, up_with
from .sound.decision import radius as sound_radius
from .sound.forward_error import ieee_arithmetic, norm_dtype, norm_rows, sample_norm_constants

__all__ = ["BlockedLinear", "ExportedOutputs", "FrozenGloroNet", "FrozenOutput", "MinMax", "Residual",
           "export_onnx", "export_pt2", "freeze", "round_up_to", "to_onnx"]

_SUPPORTED = (gnn.Conv2d, gnn.LiResBlock, gnn.Linear, gnn.MinMax, gnn.ReLU, gnn.Flatten,
              gnn.MaxPool2d, gnn.AvgPool2d)
OUTPUT_NAMES = ("logits", "certified", "radius")


class MinMax(nn.Module):
    """GroupSort-2 over the channel halves: [min(a, b), max(a, b)] (as ``gloro_fast.nn.MinMax``,
    without its argument check: the frozen model's shapes are fixed). ``contiguous_out``:
    the output is flattened next (set by :func:`freeze`), so eager evaluation writes it
    contiguous even from a channels_last x, as the live pass's fused kernel does: the
    flatten then copies nothing."""

    def __init__(self, contiguous_out: bool = False) -> None:
        super().__init__()
        self.contiguous_out = bool(contiguous_out)

    def extra_repr(self) -> str:
        return "contiguous_out=True" if self.contiguous_out else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
        # eager: both halves written straight into one output, as the live layer does (a
        # torch.cat reads and writes everything once more); the values are the same
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if self.contiguous_out else torch.empty_like(x)
        half = a.shape[1]
        torch.minimum(a, b, out=out[:, :half])
        torch.maximum(a, b, out=out[:, half:])
        return out


class Residual(nn.Module):
    """y = conv(x) + x: a LiResNet block (``conv`` carries the bias, as the live block adds
    it in the convolution before the identity)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


class BlockedLinear(nn.Linear):
    """``nn.Linear`` evaluated as the live model's certifying pass evaluates it: each dot
    product summed in ``blocks`` blocks (``gloro_fast.ops.blocked_linear_reference``: one
    batched matrix product, the blocks added as a fixed tree, then the bias: plain torch
    operations, no custom op, the bits of the live pass's C++ kernel), the evaluation the
    sound certificate's rounding allowance describes."""

    def __init__(self, in_features: int, out_features: int, blocks: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.blocks = int(blocks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blocked_linear_reference(x, self.weight, self.bias, self.blocks)


class FrozenOutput(NamedTuple):
    """What one frozen pass computes: logits [f, f_⊥] (B, C+1) in the model's dtype,
    certified predictions (B,) int64 (C: not certified, ⊥) and certified radii (B,) (float64
    for the sound certificate, the model's dtype for the estimate)."""

    logits: torch.Tensor
    certified: torch.Tensor
    radius: torch.Tensor


def round_up_to(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 ``value`` rounded *up* to ``dtype`` (float32 or float64): the smallest
    ``dtype`` number ≥ it.

    The live model rounds to nearest and steps up with ``torch.nextafter`` where that fell
    below; ONNX has no nextafter, so the step is the exactly equivalent float64 arithmetic:
    for a float32 number a = ±m·2^e (1 ≤ m < 2, normal) the next one up is a + |a|·2⁻²⁴·(1 +
    2⁻²⁶) rounded to nearest: the addend lies strictly between half a spacing and a spacing
    of a's binade (and below half of the finer spacing just above −2^e), with room of 2⁻²⁶
    relative for the float64 roundings (≤ 2⁻⁵³). Subnormals and zero step by the smallest
    subnormal (exact), −inf (a value below the most negative number) to that number.
    """
    if dtype == torch.float64:
        return value
    if dtype != torch.float32:
        # torch converts float64 to float16/bfloat16 through float32: a double rounding
        # the step below does not account for
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    info = torch.finfo(dtype)
    # float64 tensors, not Python numbers: see the module docstring (the ONNX exporter)
    normal, smallest, step, lowest = (value.new_tensor(v) for v in (
        float(info.smallest_normal), float(info.smallest_normal) * float(info.eps),
        float(info.eps) / 2.0 * (1.0 + 2.0 ** -26), -float(info.max)))
    low = value.to(dtype)
    below = low.to(torch.float64)
    up_one = torch.where(below.abs() < normal, below + _spread(smallest, below),
                         below + below.abs() * _spread(step, below))
    up_one = torch.where(below == -math.inf, lowest, up_one)
    return torch.where(below < value, up_one.to(dtype), low)


# ---------------------------------------------------------------------------- layers


def _check_exact_type(name: str, layer: nn.Module) -> None:
    if type(layer) not in _SUPPORTED:
        names = ", ".join(t.__name__ for t in _SUPPORTED)
        raise TypeError(
            f"freeze: layer {name} ({type(layer).__name__}) is not supported: a frozen model is "
            f"built from the gloro_fast.nn layers it knows ({names}) in a Sequential body"
        )


def _param(tensor: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    return None if tensor is None else nn.Parameter(tensor.detach().clone(), requires_grad=False)


def _conv(layer: gnn.Conv2d) -> nn.Module:
    """The live convolution as torch.nn layers computing the same operations: zero padding
    in the convolution when it is symmetric, else a ZeroPad2d first (as the live layer's
    F.pad), the bias in the convolution, the identity added last for a LiResBlock."""
    top, bottom, left, right = layer.pads_for(layer.input_shape[1:])
    symmetric = top == bottom and left == right
    conv = nn.utils.skip_init(
        nn.Conv2d, layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
        padding=(top, left) if symmetric else 0, dilation=layer.dilation, groups=layer.groups,
        bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype,
    )
    conv.weight = _param(layer.weight)
    if layer.bias is not None:
        conv.bias = _param(layer.bias)
    module = conv if symmetric else nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
    return Residual(module) if layer.residual else module


def _frozen_layer(layer: nn.Module, certifying: bool = False) -> nn.Module:
    """The torch.nn layer computing ``layer``'s forward, or (``certifying``) its
    ``certifying_forward``, the evaluation the sound certificate describes."""
    kind = type(layer)
    if kind in (gnn.Conv2d, gnn.LiResBlock):
        return _conv(layer)
    if kind is gnn.Linear:
        blocks, _ = certifying_blocks(layer.in_features)
        if certifying and blocks > 1:
            make, kwargs = BlockedLinear, {"blocks": blocks}
        else:
            make, kwargs = nn.Linear, {}
        linear = nn.utils.skip_init(make, layer.in_features, layer.out_features,
                                    bias=layer.bias is not None, device=layer.weight.device,
                                    dtype=layer.weight.dtype, **kwargs)
        linear.weight = _param(layer.weight)
        if layer.bias is not None:
            linear.bias = _param(layer.bias)
        return linear
    if kind is gnn.MinMax:
        return MinMax()
    if kind is gnn.ReLU:
        return nn.ReLU()
    if kind is gnn.Flatten:
        return nn.Flatten(layer.start_dim, layer.end_dim)
    if kind is gnn.MaxPool2d:
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                            ceil_mode=layer.ceil_mode)
    return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                        layer.count_include_pad, layer.divisor_override)


# ---------------------------------------------------------------------------- the model


def _spread(constant: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float64 constant expanded to ``like``'s shape (a view: free in torch).

    In an ONNX graph this makes every constant operand of an arithmetic node a tensor whose
    shape depends on the batch, which no optimiser can fold: ONNX Runtime's NoopElimination
    removes an ``Add``/``Sub``/``Mul``/``Div`` by a one-element constant whose value *cast to
    float32* is 0 or 1, which would delete x·(1 + 2⁻⁵⁰), x + 2⁻¹⁰⁷⁴ and a layer bound
    U = 1 + 10⁻¹⁰ — every upward rounding of the sound test.
    """
    return constant.expand_as(like)


def _row(table_row: torch.Tensor, like: torch.Tensor) -> List[torch.Tensor]:
    """The entries of a row of constants, each spread like ``like`` (indexing, not unbind:
    ONNX Runtime runs an unbind as a slow SplitToSequence)."""
    return [_spread(table_row[i], like) for i in range(table_row.shape[0])]


class FrozenGloroNet(nn.Module):
    """A GloRo net as plain torch.nn layers and constants; built by :func:`freeze`.

    ``forward(x)`` returns the (B, C+1) logits [f, f_⊥] (argmax = the certified prediction,
    C meaning ⊥); ``certify(x)``, ``certified_radius(x)`` and ``outputs(x)`` (all three at
    once) are those of the live model at the frozen ε. Buffers: ``lipschitz`` (K),
    ``distances`` (D_ji), ``margin_lipschitz`` (K_ji); for the sound certificate also the
    rounding allowance's linear forms (``forms_matrix``, ``forms_slopes``,
    ``forms_safe_slopes``, ``forms_has_slope``: :class:`gloro_fast.sound.decision.LinearForms`),
    ``norm_scale`` (per recorded activation: factor and offset of its norm bound),
    ``epsilon64`` and the arithmetic's constants ``c_*`` (:mod:`gloro_fast.sound.decision`).
    """

    lipschitz: torch.Tensor
    distances: torch.Tensor
    margin_lipschitz: torch.Tensor

    def __init__(self, body: nn.Sequential, measured: Sequence[bool], head: nn.Linear,
                 input_shape: Sequence[int], epsilon: float, certificate: str, dtype: torch.dtype,
                 lipschitz: torch.Tensor, distances: torch.Tensor, margin_lipschitz: torch.Tensor,
                 bottom_offsets: Optional[torch.Tensor] = None, forms: Optional[LinearForms] = None,
                 norm_scale=None) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.measured = tuple(bool(m) for m in measured)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.epsilon = float(epsilon)
        self.certificate = certificate
        self.dtype = dtype
        self.num_classes = head.out_features
        # the live certifying pass's layout (GloroNet: channels_last on the CPU before a
        # first convolution), so that the convolutions sum in the same order
        self.opens_with_convolution = _opens_with_convolution(body)
        device = head.weight.device

        def constant(value):
            return torch.as_tensor(value, dtype=torch.float64).to(device).clone()

        self.register_buffer("lipschitz", lipschitz.detach().clone())
        self.register_buffer("distances", distances.detach().clone())
        self.register_buffer("margin_lipschitz", margin_lipschitz.detach().clone())
        if certificate == "estimate":
            self.register_buffer("bottom_offsets", bottom_offsets.detach().clone())   # (εK)·D_ji
        else:
            for name in ("matrix", "slopes", "safe_slopes", "has_slope"):
                self.register_buffer(f"forms_{name}", getattr(forms, name).detach().to(device).clone())
            self.forms_factor, self.forms_cap = forms.factor, forms.cap
            self.register_buffer("norm_scale", constant(norm_scale).reshape(-1, 2))
            self.register_buffer("epsilon64", constant(epsilon))
            for name, value in {**ROUNDING, "factor": forms.factor, "cap": forms.cap}.items():
                self.register_buffer(f"c_{name}", constant(value))
        self.eval()

    def extra_repr(self) -> str:
        return (f"certificate={self.certificate!r}, epsilon={self.epsilon}, input_shape={self.input_shape}, "
                f"dtype={self.dtype}, K={float(self.lipschitz):.6g}")

    # -- checks (metadata only: no host synchronisation) ----------------------------------
    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_batch_shape("x", x, self.input_shape)
        weight = self.head.weight
        if weight.dtype != self.dtype or self.distances.dtype != self._distances_dtype:
            raise TypeError(
                f"this model was frozen for {self.dtype} evaluation and then converted; its "
                "rounding allowance would not hold: freeze the live model in the dtype it should run in"
            )
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the model's dtype {self.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x must be on the model's device {weight.device}, got {x.device}")

    @property
    def _distances_dtype(self) -> torch.dtype:
        return torch.float64 if self.certificate == "sound" else self.dtype

    def _run(self, fn, x):
        self._check_input(x)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return fn(x)
        # as the live model: IEEE arithmetic in the model's dtype (no TF32, no autocast)
        with torch.no_grad(), ieee_arithmetic(x.device.type):
            return fn(x)

    # -- public API ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C+1) logits [f, f_⊥]: argmax is the certified prediction (C: ⊥)."""
        return self._run(lambda t: self._outputs(t, radius=False).logits, x)

    def outputs(self, x: torch.Tensor) -> FrozenOutput:
        """Logits, certified predictions and certified radii from one pass (what the
        exported programs return)."""
        return self._run(lambda t: self._outputs(t, radius=True), x)

    def certify(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64: the certified class at the frozen ε, or C (⊥)."""
        return self._run(lambda t: self._outputs(t, radius=False).certified, x)

    def certified_radius(self, x: torch.Tensor) -> torch.Tensor:
        """(B,): the largest l2 radius the certificate holds at."""
        return self._run(lambda t: self._outputs(t, radius=True).radius, x)

    # -- the computation -------------------------------------------------------------------
    def _constant(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The accessor of :mod:`gloro_fast.sound.decision`: buffer ``c_<name>`` spread like
        ``like``."""
        return _spread(self.get_buffer(f"c_{name}"), like)

    def _norm(self, h: torch.Tensor, index: int) -> torch.Tensor:
        """activation_norm_upper(h) (gloro_fast.sound.forward_error), its constants from
        ``norm_scale``."""
        parts = torch.linalg.vector_norm(norm_rows(h), dim=2, dtype=norm_dtype(h.dtype))
        total = torch.linalg.vector_norm(parts, dim=1, dtype=torch.float64)
        factor, offset = _row(self.norm_scale[index], total)
        return up_with(up_with(total * factor, self._constant) + offset, self._constant)

    def _features(self, x: torch.Tensor):
        """Body and head; for the sound certificate also the norms the live
        ``GloroNet.sound_forward`` records (at each affine layer's input, and of the features)."""
        sound = self.certificate == "sound"
        norms: List[torch.Tensor] = []
        h = x
        for i, (layer, measured) in enumerate(zip(self.body, self.measured)):
            if sound and measured:
                norms.append(self._norm(h, len(norms)))
            if i == 0 and self._channels_last(h):  # after the input's norm, as the live pass
                h = channels_last(h)
            h = layer(h)
        features = self._norm(h, len(norms)) if sound else None
        return self.head(h), norms, features

    def _channels_last(self, x: torch.Tensor) -> bool:
        """Whether the body runs on x laid out channels_last (:func:`gloro_fast.nn.conv.channels_last`):
        as the live certifying pass, on the CPU before a first convolution, also in a .pt2
        program (whose graph keeps the layout); not in ONNX, which has no layouts."""
        return (self.opens_with_convolution and x.dim() == 4 and x.device.type == "cpu"
                and not torch.onnx.is_in_onnx_export())

    def _outputs(self, x: torch.Tensor, radius: bool) -> FrozenOutput:
        logits, norms, features = self._features(x)
        if self.certificate == "estimate":
            return self._estimate(logits, radius)
        return self._decide(logits, norms, features, radius)

    def _decide(self, logits: torch.Tensor, norms: List[torch.Tensor], features: torch.Tensor,
                radius: bool = True) -> FrozenOutput:
        """The sound decision from the logits and the recorded norms: the live
        ``SoundBounds.allowance``, ``bottom`` and ``radius`` (one implementation,
        :mod:`gloro_fast.sound.decision`), with the constants as buffers."""
        allowance = self._allowance(norms, features)
        eps = _spread(self.epsilon64, allowance.s1)
        bottom, certified, top = decide(logits, self.distances, allowance, eps, self._constant)
        augmented = torch.cat([logits, round_up_to(bottom, logits.dtype).unsqueeze(1)], dim=1)
        predicted = torch.where(certified, top, torch.full_like(top, self.num_classes))
        rad = sound_radius(logits, self.distances, allowance, self._constant) if radius else predicted
        return FrozenOutput(augmented, predicted, rad)

    def _allowance(self, norms: List[torch.Tensor], features: torch.Tensor) -> Allowance:
        """The live ``SoundBounds.allowance`` for the recorded norms."""
        forms = LinearForms(self.forms_matrix, self.forms_slopes, self.forms_safe_slopes,
                            self.forms_has_slope, self.forms_factor, self.forms_cap)
        basis = torch.stack(list(norms) + [features, torch.ones_like(features)], dim=1)
        return forms.evaluate(basis, self._constant)

    def _estimate(self, logits: torch.Tensor, radius: bool) -> FrozenOutput:
        """The GloRo paper's test as ``GloroNet`` computes it (``bottom_logit`` and
        ``certified_radius(certificate="estimate")``), in the model's dtype."""
        top = logits.argmax(dim=1)
        own = torch.arange(self.num_classes, device=logits.device) == top.unsqueeze(1)
        rival = logits + self.bottom_offsets.index_select(0, top)
        bottom = torch.where(own, torch.full_like(rival, -math.inf), rival).amax(dim=1)
        certified = logits.amax(dim=1) > bottom
        predicted = torch.where(certified, top, torch.full_like(top, self.num_classes))
        augmented = torch.cat([logits, bottom.unsqueeze(1)], dim=1)
        if not radius:
            return FrozenOutput(augmented, predicted, predicted)
        gaps = logits.gather(1, top.unsqueeze(1)) - logits
        k_ji = self.margin_lipschitz.index_select(0, top)
        ratio = torch.where(k_ji > 0, gaps / k_ji,
                            torch.where(gaps > 0, torch.full_like(gaps, math.inf), torch.zeros_like(gaps)))
        ratio = torch.where(own, torch.full_like(ratio, math.inf), ratio)
        rad = ratio.amin(dim=1).clamp_min(0.0)
        ok = torch.isfinite(logits).all(dim=1)  # a non-finite input is never certified
        return FrozenOutput(augmented, predicted, torch.where(ok, rad, torch.zeros_like(rad)))


# ---------------------------------------------------------------------------- freezing


def freeze(model: GloroNet, certificate: str = "sound", epsilon: Optional[float] = None) -> FrozenGloroNet:
    """A :class:`FrozenGloroNet` that takes ``model``'s decisions at radius ``epsilon``
    (default: the model's ε) with ``certificate`` ``"sound"`` (default) or ``"estimate"``.

    The weights are copied (editing the live model later does not change the frozen one)
    and the bounds are the live model's own cached ones (``model.sound_bounds()`` or
    ``model.estimate_bounds()``); nothing of ``model`` is modified. The body must be a
    chain of gloro_fast.nn layers (every paper architecture is) in float32 or float64.
    """
    if not isinstance(model, GloroNet):
        raise TypeError(f"model must be a gloro_fast.GloroNet, got {type(model).__name__}")
    certificate = check_certificate(certificate)
    eps = model.epsilon if epsilon is None else check_epsilon(epsilon)
    dtype = model.head.weight.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"model must be float32 or float64 to be frozen, got {dtype}")
    if not is_chain(model):
        raise TypeError("freeze: model.body must be a Sequential (possibly nested) of gloro_fast.nn layers")
    named = named_layers(model)
    for name, layer in named:
        _check_exact_type(name, layer)
        if isinstance(layer, gnn.Conv2d) and layer.input_shape is None:
            raise ValueError(
                f"freeze: layer {name} (Conv2d) has no input size yet; pass input_shape= to "
                "GloroNet or run one forward pass before freezing"
            )
    input_shape = tuple(model.input_shape or inferred_input_shape(model))
    layers = [layer for _, layer in named]
    head = _frozen_layer(model.head)
    body = nn.Sequential(*[_frozen_layer(layer, certifying=certificate == "sound") for layer in layers])
    for first, second in zip(body, list(body)[1:]):
        if isinstance(first, MinMax) and isinstance(second, nn.Flatten):
            first.contiguous_out = True
    device = model.head.weight.device
    if certificate == "estimate":
        est = model.estimate_bounds()
        lipschitz = est.lipschitz.detach().clone()
        distances = est.distances.detach().clone()
        # as bottom_logit: c = ε·K in the model's dtype, then f_i + c·D_ji
        offsets = ((eps * lipschitz) * distances).detach()
        measured = tuple(False for _ in layers)
        return FrozenGloroNet(body, measured, head, input_shape, eps, certificate, dtype,
                              lipschitz, distances, (lipschitz * distances).detach(), bottom_offsets=offsets)
    sb = model.sound_bounds()
    if sb.steps is None or len(sb.steps) != len(layers) or sb.forms.per_sample is None:  # not reached for a chain
        raise TypeError("freeze: the model's sound bounds have no per-layer rounding steps")
    measured = tuple(step is not None for step in sb.steps)
    shapes = _norm_shapes(body, measured, input_shape, model.head.weight)
    norm_scale = [sample_norm_constants(shape, dtype) for shape in shapes]
    lipschitz = torch.tensor(sb.lipschitz, dtype=torch.float64, device=device)
    return FrozenGloroNet(body, measured, head, input_shape, eps, certificate, dtype, lipschitz,
                          sb.distances.to(device), model.margin_lipschitz("sound"), forms=sb.forms.per_sample,
                          norm_scale=norm_scale)


def _opens_with_convolution(body: nn.Sequential) -> bool:
    """Whether the frozen body's first layer is a convolution (``_conv``'s forms: nn.Conv2d,
    padding then nn.Conv2d, Residual)."""
    first = body[0] if len(body) else None
    if isinstance(first, nn.Sequential) and len(first):
        first = first[-1]
    return isinstance(first, (nn.Conv2d, Residual))


def _norm_shapes(body: nn.Sequential, measured, input_shape, reference: torch.Tensor) -> List[Tuple[int, ...]]:
    """The sample shape of every activation whose norm the sound pass records (the inputs
    of the affine layers, then the features), from a pass on one zero input."""
    shapes = []
    with torch.no_grad():
        h = torch.zeros((1,) + tuple(input_shape), dtype=reference.dtype, device=reference.device)
        for layer, record in zip(body, measured):
            if record:
                shapes.append(tuple(h.shape[1:]))
            h = layer(h)
    shapes.append(tuple(h.shape[1:]))
    return shapes


# ---------------------------------------------------------------------------- exporting


class ExportedOutputs(nn.Module):
    """What the exported programs (.pt2, ONNX) compute: :meth:`FrozenGloroNet.outputs` as a
    tuple (logits, certified, radius)."""

    def __init__(self, frozen: FrozenGloroNet) -> None:
        super().__init__()
        self.frozen = frozen
        self.eval()

    def forward(self, x: torch.Tensor):
        return tuple(self.frozen.outputs(x))


def _frozen(model, certificate, epsilon) -> FrozenGloroNet:
    if isinstance(model, FrozenGloroNet):
        if certificate not in (None, model.certificate) or epsilon not in (None, model.epsilon):
            raise ValueError(
                f"certificate and epsilon apply when freezing a GloroNet; this model is already frozen "
                f"(certificate={model.certificate!r}, epsilon={model.epsilon})"
            )
        return model
    if not isinstance(model, GloroNet):
        raise TypeError(f"model must be a gloro_fast.GloroNet or FrozenGloroNet, got {type(model).__name__}")
    return freeze(model, "sound" if certificate is None else certificate, epsilon)


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path


def _example(frozen: FrozenGloroNet) -> Tuple[torch.Tensor, dict]:
    """An example batch of 2 (a batch of 1 would be specialised) and the dynamic batch axis."""
    x = torch.zeros((2,) + frozen.input_shape, dtype=frozen.dtype, device=frozen.head.weight.device)
    return x, {"x": {0: torch.export.Dim("batch", min=1)}}


def export_pt2(model: Union[GloroNet, FrozenGloroNet], path, certificate: Optional[str] = None,
               epsilon: Optional[float] = None) -> "torch.export.ExportedProgram":
    """Freeze ``model`` (unless it is frozen already) and write it as a ``torch.export``
    program to ``path`` (``.pt2``): input ``x`` (B, *input_shape), outputs (logits (B, C+1),
    certified (B,) int64, radius (B,)), any batch size. Load it with
    ``torch.export.load(path).module()``; gloro_fast is not needed to run it."""
    path = _check_path(path)
    frozen = _frozen(model, certificate, epsilon)
    x, dynamic = _example(frozen)
    program = torch.export.export(ExportedOutputs(frozen), (x,), dynamic_shapes=dynamic)
    atomic_write(path, lambda f: torch.export.save(program, f))
    return program


def export_onnx(model: Union[GloroNet, FrozenGloroNet], path, certificate: Optional[str] = None,
                epsilon: Optional[float] = None, opset_version: Optional[int] = None):
    """Freeze ``model`` (unless it is frozen already) and write it as an ONNX model to
    ``path`` (torch's exporter, one file with the weights): input ``x`` (B, *input_shape),
    outputs ``logits`` (B, C+1), ``certified`` (B,) int64 and ``radius`` (B,), any batch
    size; only standard ONNX operators. Returns the ``onnx.ModelProto`` written."""
    path = _check_path(path)
    frozen = _frozen(model, certificate, epsilon)
    x, dynamic = _example(frozen)
    proto = to_onnx(ExportedOutputs(frozen), (x,), dynamic, ["x"], list(OUTPUT_NAMES), opset_version)
    atomic_write_bytes(path, proto.SerializeToString())
    return proto


def to_onnx(module: nn.Module, args: tuple, dynamic_shapes, input_names, output_names,
            opset_version: Optional[int] = None):
    """``module`` as an ``onnx.ModelProto``, by torch's ONNX exporter with the settings the
    certificates need.

    ``optimize=False``: the exporter's graph optimiser treats x·(1 ± 2⁻⁵⁰) and x + c for a
    tiny c (2⁻¹⁰⁷⁴, 2⁻¹⁴⁹, even 10⁻³⁰⁰) as identities and removes them, which would delete
    every upward rounding of the sound test. ONNX Runtime's optimisations, at their highest
    level, keep them in the form :func:`_spread` gives them (tests/test_export.py).
    """
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    with warnings.catch_warnings():
        # torch's own deprecation notices from inside the exporter: nothing the caller can act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=list(input_names), output_names=list(output_names),
                                    external_data=False, optimize=False, verbose=False, **kwargs)
    return program.model_proto

