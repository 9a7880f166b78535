"""Shared test helpers (imported as ``from tests.helpers import …``): explicit matrices of
linear operators, matrices with a planted spectral gap, the reference backend, an
independent reference of "same"-padded convolutions, a log of dispatched ops and the CLI's
one-line error. The fixtures (``gen``, ``single_thread``, ``backend``, ``debug_checks``)
are in tests/conftest.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gloro_fast import nn as gnn
from gloro_fast.ops import use_backend


def explicit_matrix(op, in_shape, dtype=torch.float64):
    """The matrix M (m × n) of the linear map ``op`` on inputs of shape ``in_shape``.

    ``op`` takes a batch (n, *in_shape) and returns (n, *out_shape); column k of M is
    ``op`` applied to the k-th standard basis vector, flattened.
    """
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *in_shape)
    with torch.no_grad():
        out = op(basis)
    return out.reshape(n, -1).t().contiguous()


def planted_matrix(m, n, gen, top, rest, dtype=torch.float64):
    """W = U diag(s) Vᵀ (m × n) with s_1 = top and the others in [0, rest): a clear
    spectral gap, so power iteration converges in few steps."""
    r = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=dtype))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    s = torch.rand(r, generator=gen, dtype=dtype) * rest
    s[0] = top
    return q1[:, :r] @ torch.diag(s) @ q2[:, :r].t()


def reference_backend():
    """Force the reference backend inside the block, restoring the previous choice."""
    return use_backend("reference")


def tf_same_pads(size, k, s):
    """TensorFlow "same" padding of one axis (before, after), written independently of
    gloro_fast.nn.same_padding."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def same_conv_reference(layer, x, weight=None):
    """What a "same"-padded gloro_fast Conv2d (or a LiResBlock: + x) computes without its bias,
    by F.pad + F.conv2d with ``weight`` (default: the layer's)."""
    w = layer.weight if weight is None else weight
    kh, kw = w.shape[2:]
    top, bottom = tf_same_pads(x.shape[2], kh, layer.stride[0])
    left, right = tf_same_pads(x.shape[3], kw, layer.stride[1])
    out = F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, layer.stride)
    return out + x if isinstance(layer, gnn.LiResBlock) else out


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched inside the block (``log.names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def one_error_line(capsys, *needles):
    """The command printed exactly one ``gloro-fast: error: …`` line holding every needle."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gloro-fast: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
