"""gloro_fast.nn layers against their torch.nn equivalents (float32), paired rounds.

Each case times a gloro_fast layer and the torch.nn layer a user would write for the same
map (same weights, same zero padding, same activation), as interleaved pairs; the record
carries the median of the per-pair throughput ratios torch.nn time / gloro_fast time
(report.py: target ≥ 1/1.02, i.e. at most 2 % slower), eager and under ``torch.compile``,
forward (no autograd) and forward + backward (into the input and the weights).

The torch.nn equivalents: ``nn.Linear``; ``nn.Conv2d`` with the padding as an argument where
it is symmetric, else ``nn.ZeroPad2d`` then ``nn.Conv2d``; a LiResNet block as x + conv(x);
MinMax as the chunk/min/max/cat a user writes; ``nn.MaxPool2d`` / ``nn.AvgPool2d``. Every
pair is checked to compute the same output before it is timed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.harness import DEVICE, DTYPE, pick, run_paired
from gloro_fast import nn as gnn

# 128: the work dominates; 1: one sample, where a layer's per-call Python shows (a
# convolution's input-size check was a tenth of a one-sample convolution)
BATCHES = pick((128, 1), (32,))
PAIRS = pick(21, 7)
CH, HW, FEATURES = 32, 32, 1024


class TorchMinMax(nn.Module):
    """MinMax as a user writes it: the channel halves' elementwise min and max, concatenated."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


class TorchResidual(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return x + self.conv(x)


def _conv_pair(padding, stride=1, dilation=1, groups=1, torch_padding=None, pad=None):
    ours = gnn.Conv2d(CH, CH, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      input_shape=(CH, HW, HW))
    conv = nn.Conv2d(CH, CH, 3, stride=stride, padding=0 if pad else torch_padding, dilation=dilation,
                     groups=groups)
    with torch.no_grad():
        conv.weight.copy_(ours.weight)
        conv.bias.copy_(ours.bias)
    theirs = nn.Sequential(nn.ZeroPad2d(pad), conv) if pad else conv
    return ours, theirs


def _linear_pair():
    ours = gnn.Linear(FEATURES, FEATURES)
    theirs = nn.Linear(FEATURES, FEATURES)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    return ours, theirs


def _liresblock_pair():
    ours = gnn.LiResBlock(CH, 3, input_shape=(CH, HW, HW))
    conv = nn.Conv2d(CH, CH, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(ours.weight)
        conv.bias.copy_(ours.bias)
    return ours, TorchResidual(conv)


LAYERS = {
    "Linear": (_linear_pair, (FEATURES,)),
    "Conv2d padding=1": (lambda: _conv_pair(1, torch_padding=1), (CH, HW, HW)),
    "Conv2d same": (lambda: _conv_pair("same", torch_padding="same"), (CH, HW, HW)),
    "Conv2d same stride 2": (lambda: _conv_pair("same", stride=2, pad=(0, 1, 0, 1)), (CH, HW, HW)),
    "Conv2d (top, bottom, left, right)": (lambda: _conv_pair((1, 0, 2, 1), pad=(2, 1, 1, 0)), (CH, HW, HW)),
    "Conv2d dilation 2 groups 4": (lambda: _conv_pair(2, dilation=2, groups=4, torch_padding=2), (CH, HW, HW)),
    "LiResBlock": (_liresblock_pair, (CH, HW, HW)),
    "MinMax": (lambda: (gnn.MinMax(), TorchMinMax()), (CH, HW, HW)),
    "MaxPool2d": (lambda: (gnn.MaxPool2d(2), nn.MaxPool2d(2)), (CH, HW, HW)),
    "AvgPool2d": (lambda: (gnn.AvgPool2d(2), nn.AvgPool2d(2)), (CH, HW, HW)),
}


def _runner(module, x, mode, grad):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return module(x)
        return fn

    def fn():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        out = module(x)
        out.backward(grad)
        return out
    return fn


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("compile_", (False, True), ids=("eager", "compile"))
@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer(benchmark, layer, mode, compile_, batch):
    torch.manual_seed(0)
    make, shape = LAYERS[layer]
    ours, theirs = (m.to(DEVICE, DTYPE) for m in make())
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch,) + shape, generator=g).to(DEVICE, DTYPE)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=g).to(DEVICE, DTYPE)
    if mode == "fwd+bwd":
        x.requires_grad_(True)
    if compile_:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    where = "compile" if compile_ else "eager"
    run_paired(benchmark, _runner(ours, x, mode, grad), _runner(theirs, x, mode, grad),
               case=f"layer {layer} {mode} {where} B={batch}", contender=f"gloro_fast vs torch.nn [{where}]",
               params={"layer": layer, "B": batch, "compiled": compile_}, size=batch, pairs=PAIRS,
               extra={"op": "layer_paired", "mode": mode})
