"""``power_iteration_conv(weight, u, n_iter, ...)``: operator norm of a convolution.

The operator is the real convolution A on the actual input size, or I + A for a LiResNet
block (``residual=True``): :mod:`gloro_fast.ops.convolution`.

    repeat n_iter times (no autograd):  u ← Aᵀ A u / ‖Aᵀ A u‖
    σ̂ = ‖A u‖                           (autograd w.r.t. the kernel only)

Layers of one configuration (kernel shape, stride, padding, dilation, groups, residual,
iterate shape — e.g. the blocks of a LiResNet) can run together with
:func:`power_iteration_conv_batched`: their iterates stacked on the channel axis and their
kernels on the output axis make ONE grouped convolution (groups × layers), normalised per
layer.

The op ``torch.ops.gloro_fast.power_iteration_conv`` takes N layers at once: the iterates
(N, C_in, H, W) stacked on axis 0, their kernels stacked in the weight (N·C_out, C_in/groups,
kh, kw), padding as (top, bottom, left, right); it returns (u (N, C_in, H, W), σ̂ (N,),
y (N, C_out, H', W')), y_l = A_l u_l (+ u_l for a residual block) being the image whose norm
is σ̂_l. Its backward op ``power_iteration_conv_backward`` gives the gradient of Σ g_l σ̂_l
w.r.t. the stacked weight from that image (one weight-gradient convolution of the padded u
against y·g/σ̂; the image is not computed again). Kernels: the reference below, the C++
kernels (csrc/: library convolutions with fused epilogues) and the Triton epilogues
(kernels/), chosen by the backend table (gloro_fast/ops/registry.py).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .._validation import check_positive_int, check_tensor
from ._library import define_op
from ._power_iteration_common import power_iterate, runs_reference
from .convolution import conv_operator, conv_operator_adjoint, normalize_padding, pad_input, pair

__all__ = [
    "power_iteration_conv",
    "power_iteration_conv_batched",
    "power_iteration_conv_batched_reference",
    "power_iteration_conv_reference",
    "conv_operator",
    "conv_operator_adjoint",
]

SCHEMA = ("(Tensor weight, Tensor iterate, int n_iter, int[] stride, int[] padding, int[] dilation, int groups, "
          "bool residual) -> (Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor grad_sigma, Tensor weight, Tensor iterate, Tensor sigma, Tensor image, int[] stride, "
                   "int[] padding, int[] dilation, int groups, bool residual) -> Tensor")


def power_iteration_conv_reference(
    weight, iterate, n_iter, stride, padding, dilation, groups, residual
):
    """Reference of one layer: ``iterate`` (1, C_in, H, W), ``padding`` (top, bottom, left,
    right). Returns (u_new (1, C_in, H, W), sigma 0-dim)."""
    args = (stride, padding, dilation, groups)
    hw = iterate.shape[2:]
    u = iterate
    with torch.no_grad():
        w = weight.detach()
        u = power_iterate(lambda x: conv_operator_adjoint(conv_operator(x, w, *args, residual=residual), w, *args,
                                                          hw, residual=residual), u, n_iter)
    sigma = torch.linalg.vector_norm(conv_operator(u, weight, *args, residual=residual))
    return u, sigma


def power_iteration_conv_batched_reference(
    weight, iterate, n_iter, stride, padding, dilation, groups, residual
):
    """Reference of the batched op: ``iterate`` (N, C_in, H, W) holds N layers' iterates,
    ``weight`` (N·C_out, C_in/groups, kh, kw) their kernels stacked on the output axis.
    One grouped convolution (groups·N) on the channel-stacked iterate, normalised per
    layer. Returns (u_new (N, C_in, H, W), sigma (N,))."""
    u, sigma, _image = _batched_reference(weight, iterate, n_iter, stride, padding, dilation, groups, residual)
    return u, sigma


def _batched_reference(weight, iterate, n_iter, stride, padding, dilation, groups, residual):
    """:func:`power_iteration_conv_batched_reference` and the image y (N, C_out, H', W') whose
    per-layer norms are σ̂ (y_l = A_l u_l, + u_l with residual)."""
    blocks, c_in, height, width = iterate.shape
    args = (stride, padding, dilation, groups * blocks)
    u = iterate.reshape(1, blocks * c_in, height, width)
    with torch.no_grad():
        w = weight.detach()
        u = power_iterate(lambda x: conv_operator_adjoint(conv_operator(x, w, *args, residual=residual), w, *args,
                                                          (height, width), residual=residual), u, n_iter, blocks)
    u = u.reshape(blocks, c_in, height, width)
    image = _stacked_image(weight, u, stride, padding, dilation, groups, residual)
    return u, torch.linalg.vector_norm(image.reshape(blocks, -1), dim=1), image


def _output_hw(input_hw, kernel_hw, stride, padding, dilation) -> Tuple[int, int]:
    """(H', W') of the convolution on an input of ``input_hw`` zero-padded by ``padding``
    (top, bottom, left, right)."""
    return tuple((input_hw[a] + padding[2 * a] + padding[2 * a + 1] - dilation[a] * (kernel_hw[a] - 1) - 1)
                 // stride[a] + 1 for a in range(2))


def _check_layer(weight, iterate, n_iter, stride, padding, dilation, groups, residual,
                 wname="weight", uname="iterate"):
    """Validate one layer's arguments; returns (n_iter, stride, padding, dilation, groups)
    with padding as (top, bottom, left, right)."""
    check_tensor(wname, weight, ndim=4, floating=True)
    check_tensor(uname, iterate, ndim=4, floating=True)
    n_iter = check_positive_int("n_iter", n_iter, allow_zero=True)
    groups = check_positive_int("groups", groups)
    stride, dilation, padding = pair(stride, "stride"), pair(dilation, "dilation"), normalize_padding(padding)
    c_out, c_in_g = weight.shape[:2]
    if iterate.shape[0] != 1 or iterate.shape[1] != c_in_g * groups:
        raise ValueError(
            f"{uname} must have shape (1, {c_in_g * groups}, H, W) for {wname} {tuple(weight.shape)} "
            f"and groups={groups}, got {tuple(iterate.shape)}"
        )
    if c_out % groups:
        raise ValueError(f"groups={groups} must divide the {c_out} output channels of {wname}")
    if iterate.device != weight.device or iterate.dtype != weight.dtype:
        raise ValueError(
            f"{uname} must match {wname} in dtype and device, got {iterate.dtype}/{iterate.device} "
            f"vs {weight.dtype}/{weight.device}"
        )
    for axis, name in enumerate(("height", "width")):
        size = iterate.shape[2 + axis] + padding[2 * axis] + padding[2 * axis + 1]
        if size < dilation[axis] * (weight.shape[2 + axis] - 1) + 1:
            raise ValueError(
                f"padded input {name} {size} is smaller than the dilated kernel of {wname} "
                f"{tuple(weight.shape)}"
            )
    if residual:
        out = _output_hw(iterate.shape[2:], weight.shape[2:], stride, padding, dilation)
        if c_out != iterate.shape[1] or out != tuple(iterate.shape[2:]):
            raise ValueError(
                "residual=True needs a convolution whose output shape equals its input shape "
                f"{tuple(iterate.shape[1:])}, got ({c_out}, {out[0]}, {out[1]})"
            )
    return n_iter, stride, padding, dilation, groups


def _check(weights, iterates, n_iter, stride, padding, dilation, groups, residual, batched=True):
    """The op's argument check (a batch of layers of one configuration, or one layer with
    ``batched=False``, which names its arguments weight and iterate): returns
    ``(weights, iterates, checked)`` with lists and ``checked`` = ``(n_iter, stride, padding,
    dilation, groups)`` (None for no layers)."""
    weights, iterates = list(weights), list(iterates)
    if len(weights) != len(iterates):
        raise ValueError(
            f"weights and iterates must have the same length, got {len(weights)} and {len(iterates)}"
        )
    checked = None
    for k, (w, u) in enumerate(zip(weights, iterates)):
        names = dict(wname=f"weights[{k}]", uname=f"iterates[{k}]") if batched else {}
        checked = _check_layer(w, u, n_iter, stride, padding, dilation, groups, residual, **names)
        if k and (w.shape != weights[0].shape or w.dtype != weights[0].dtype or w.device != weights[0].device):
            raise ValueError(
                f"weights[{k}] must match weights[0] in shape, dtype and device, got "
                f"{tuple(w.shape)}/{w.dtype}/{w.device} vs "
                f"{tuple(weights[0].shape)}/{weights[0].dtype}/{weights[0].device}"
            )
        if k and u.shape != iterates[0].shape:
            raise ValueError(
                f"iterates[{k}] must match iterates[0] in shape, got {tuple(u.shape)} vs "
                f"{tuple(iterates[0].shape)}"
            )
    if not weights:
        check_positive_int("n_iter", n_iter, allow_zero=True)
    return weights, iterates, checked


def _run(weights, iterates, n_iter, stride, padding, dilation, groups, residual):
    """(u (N, C_in, H, W), sigma (N,)) for N checked layers of one configuration."""
    weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    iterate = iterates[0] if len(iterates) == 1 else torch.cat(iterates, dim=0)
    if runs_reference("power_iteration_conv", weights, weight.device.type):
        return power_iteration_conv_batched_reference(
            weight, iterate, n_iter, stride, padding, dilation, groups, residual
        )
    u, sigma, _image = _OP(weight, iterate, n_iter, list(stride), list(padding), list(dilation), groups, residual)
    return u, sigma


def power_iteration_conv(
    weight: torch.Tensor,
    iterate: torch.Tensor,
    n_iter: int = 1,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    residual: bool = False,
):
    """Power iteration on a 2-d convolution operator (or I + conv).

    Args:
        weight: kernel (c_out, c_in / groups, kh, kw).
        iterate: unit-norm u of shape (1, c_in, H, W); its H×W is the input size
            the operator acts on.
        n_iter: iterations before the estimate (0: estimate with the given u).
        stride, dilation: int or pair. padding: int, (pad_h, pad_w) or
            (top, bottom, left, right) zero padding.
        groups: channel groups, dividing c_in and c_out.
        residual: estimate ‖I + A‖ instead of ‖A‖ (needs output shape = input shape).

    Returns:
        ``(u_new, sigma)``: u_new detached, sigma 0-dim, differentiable w.r.t. weight.
    """
    _, _, checked = _check([weight], [iterate], n_iter, stride, padding, dilation, groups, residual, batched=False)
    n_iter, stride, padding, dilation, groups = checked
    if runs_reference("power_iteration_conv", [weight], weight.device.type):
        return power_iteration_conv_reference(
            weight, iterate, n_iter, stride, padding, dilation, groups, bool(residual)
        )
    u, sigma = _run([weight], [iterate], n_iter, stride, padding, dilation, groups, bool(residual))
    return u, sigma.reshape(())


def power_iteration_conv_batched(
    weights: Sequence[torch.Tensor],
    iterates: Sequence[torch.Tensor],
    n_iter: int = 1,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    residual: bool = False,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """:func:`power_iteration_conv` on several layers of ONE configuration at once.

    All ``weights`` share one shape, dtype and device, all ``iterates`` one shape (1, C_in,
    H, W), and the convolution arguments apply to every layer. The layers run as one
    grouped convolution (kernels stacked on the output axis, iterates on the channel axis,
    groups × layers) with per-layer normalisation: the same result as one call per layer.

    Returns:
        ``(list of u_new, list of sigma)``: as :func:`power_iteration_conv` per layer.
    """
    weights, iterates, checked = _check(weights, iterates, n_iter, stride, padding, dilation, groups, residual)
    if not weights:
        return [], []
    u, sigma = _run(weights, iterates, *checked, bool(residual))
    return list(u.split(1, dim=0)), list(sigma.unbind(0))


# ---- the op: reference kernels, fake kernels, autograd ----


def _stacked_image(weight, u, stride, padding, dilation, groups, residual):
    """y (N, C_out, H', W'): A_l u_l (+ u_l) of the N stacked layers (u (N, C_in, H, W))."""
    blocks, c_in, height, width = u.shape
    out = conv_operator(u.reshape(1, blocks * c_in, height, width), weight, tuple(stride), tuple(padding),
                        tuple(dilation), groups * blocks, residual=residual)
    return out.reshape(blocks, -1, out.shape[2], out.shape[3])


def _reference_forward(weight, iterate, n_iter, stride, padding, dilation, groups, residual):
    with torch.no_grad():
        u, sigma, image = _batched_reference(
            weight, iterate, n_iter, tuple(stride), tuple(padding), tuple(dilation), groups, residual
        )
    # outputs are fresh tensors: with n_iter = 0 the reference hands a view of the iterate back
    return (u.clone() if n_iter == 0 else u), sigma, image


def _stacked_sigmas(weight, iterate, stride, padding, dilation, groups, residual):
    """σ̂ (N,) of the N stacked layers as a function of the stacked weight (differentiable)."""
    image = _stacked_image(weight, iterate, stride, padding, dilation, groups, residual)
    return torch.linalg.vector_norm(image.reshape(image.shape[0], -1), dim=1)


def _reference_backward(grad_sigma, weight, iterate, sigma, image, stride, padding, dilation, groups, residual):
    # ∂σ_l/∂K_l = the weight gradient of the convolution of the padded u_l against (g_l/σ_l) y_l,
    # y_l = A_l u_l (+ u_l) the image the forward returned
    blocks, c_in, height, width = iterate.shape
    u = iterate.reshape(1, blocks * c_in, height, width)
    scale = torch.where(sigma > 0, grad_sigma / torch.where(sigma > 0, sigma, 1.0), 0.0)
    gy = (image.reshape(blocks, -1) * scale[:, None]).reshape(1, -1, image.shape[2], image.shape[3])
    return torch.nn.grad.conv2d_weight(pad_input(u, tuple(padding)), weight.shape, gy, stride=tuple(stride),
                                       padding=0, dilation=tuple(dilation), groups=groups * blocks)


def image_shape(weight_shape, iterate_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    """(N, C_out, H', W') of the op's image for the stacked weight and iterate shapes."""
    blocks = iterate_shape[0]
    return (blocks, weight_shape[0] // blocks) + _output_hw(iterate_shape[2:], weight_shape[2:], stride, padding,
                                                             dilation)


def _fake(weight, iterate, n_iter, stride, padding, dilation, groups, residual):
    return (iterate.new_empty(iterate.shape), iterate.new_empty((iterate.shape[0],)),
            iterate.new_empty(image_shape(weight.shape, iterate.shape, stride, padding, dilation)))


def _fake_backward(grad_sigma, weight, iterate, sigma, image, stride, padding, dilation, groups, residual):
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    weight, _iterate, _n_iter, stride, padding, dilation, groups, residual = inputs
    u, sigma, image = output
    ctx.mark_non_differentiable(u, image)
    ctx.conv_args = (stride, padding, dilation, groups, residual)
    ctx.save_for_backward(weight, u, sigma, image)


def _backward(ctx, grad_u, grad_sigma, grad_image):
    weight, u, sigma, image = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0]:
        if grad_sigma is None:
            grad_sigma = torch.zeros_like(sigma)
        if torch.is_grad_enabled():  # create_graph: a gradient that is itself differentiable
            with torch.enable_grad():
                w = weight if weight.requires_grad else weight.detach().requires_grad_(True)
                sigmas = _stacked_sigmas(w, u, *ctx.conv_args)
                (grad_weight,) = torch.autograd.grad(sigmas, w, grad_sigma, create_graph=True)
        else:
            grad_weight = _BACKWARD_OP(grad_sigma, weight, u, sigma, image, *ctx.conv_args)
    return grad_weight, None, None, None, None, None, None, None


_OP, _BACKWARD_OP = define_op(
    "power_iteration_conv", SCHEMA, BACKWARD_SCHEMA,
    fake=_fake, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    reference_forward=_reference_forward, reference_backward=_reference_backward,
)
