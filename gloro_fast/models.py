"""The GloRo paper's architectures (its released definitions), as GloroNet constructors.

"same" zero padding, MinMax after every layer but the head, orthogonal initialisation:

    2C2F      c16 k4 s2, c32 k4 s2, d100, head
    4C3F      c32 k3, c32 k4 s2, c64 k3, c64 k4 s2, d512, d512, head
    6C2F      c32 k3, c32 k3, c32 k4 s2, c64 k3, c64 k3, c64 k4 s2, d512, head
    8C2F      c64 k3, c64 k3, c64 k4 s2, c128 k3, c128 k3, c128 k4 s2, c256 k3, c256 k4 s2, d256, head
    LiResNet  stem conv, depth × LiResBlock(width), neck conv k4 s4 → 2·width, d512, head
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from . import nn as gnn
from ._validation import check_choice, check_input_shape
from .gloro_net import GloroNet

__all__ = ["ARCHITECTURES", "build", "cnn_2C2F", "cnn_4C3F", "cnn_6C2F", "cnn_8C2F", "liresnet"]

ConvSpec = Tuple[int, int, int]  # filters, kernel, stride


def _activation(name: str) -> gnn.LipschitzModule:
    if name == "minmax":
        return gnn.MinMax()
    if name == "relu":
        return gnn.ReLU()
    raise ValueError(f"activation must be 'minmax' or 'relu', got {name!r}")


def _conv_net(input_shape, num_classes, epsilon, convs: Sequence[ConvSpec], dense: Sequence[int],
              activation: str, **gloro_kwargs) -> GloroNet:
    input_shape = check_input_shape(input_shape, ndim=3)
    layers: List[torch.nn.Module] = []
    channels = input_shape[0]
    for filters, kernel, stride in convs:
        layers += [gnn.Conv2d(channels, filters, kernel, stride=stride, padding="same"), _activation(activation)]
        channels = filters
    layers.append(gnn.Flatten())
    features = gnn.Sequential(*layers)
    with torch.no_grad():
        width = features(torch.zeros((1,) + input_shape)).shape[1]
    for units in dense:
        layers += [gnn.Linear(width, units), _activation(activation)]
        width = units
    return GloroNet(gnn.Sequential(*layers), gnn.Linear(width, num_classes), epsilon,
                    input_shape=input_shape, **gloro_kwargs)


def cnn_2C2F(input_shape=(1, 28, 28), num_classes: int = 10, epsilon: float = 0.3,
             activation: str = "minmax", **gloro_kwargs) -> GloroNet:
    """2C2F (GloRo's MNIST ε=0.3 model). ``gloro_kwargs`` go to :class:`GloroNet`."""
    return _conv_net(input_shape, num_classes, epsilon, [(16, 4, 2), (32, 4, 2)], [100],
                     activation, **gloro_kwargs)


def cnn_4C3F(input_shape=(1, 28, 28), num_classes: int = 10, epsilon: float = 1.58,
             activation: str = "minmax", **gloro_kwargs) -> GloroNet:
    """4C3F (GloRo's MNIST ε=1.58 model)."""
    convs = [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)]
    return _conv_net(input_shape, num_classes, epsilon, convs, [512, 512], activation, **gloro_kwargs)


def cnn_6C2F(input_shape=(3, 32, 32), num_classes: int = 10, epsilon: float = 0.141,
             activation: str = "minmax", **gloro_kwargs) -> GloroNet:
    """6C2F (GloRo's CIFAR-10 model)."""
    convs = [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)]
    return _conv_net(input_shape, num_classes, epsilon, convs, [512], activation, **gloro_kwargs)


def cnn_8C2F(input_shape=(3, 64, 64), num_classes: int = 200, epsilon: float = 0.141,
             activation: str = "minmax", **gloro_kwargs) -> GloroNet:
    """8C2F (GloRo's Tiny-ImageNet model)."""
    convs = [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2),
             (256, 3, 1), (256, 4, 2)]
    return _conv_net(input_shape, num_classes, epsilon, convs, [256], activation, **gloro_kwargs)


def liresnet(input_shape=(3, 32, 32), num_classes: int = 10, epsilon: float = 0.141,
             depth: int = 6, width: int = 32, activation: str = "minmax", **gloro_kwargs) -> GloroNet:
    """A small LiResNet: stem conv 3×3 → ``width``, ``depth`` LiResBlocks (each followed by
    the activation), neck conv k4 s4 → 2·width, dense 512, head."""
    input_shape = check_input_shape(input_shape, ndim=3)
    for name, value in (("depth", depth), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    layers: List[torch.nn.Module] = [gnn.Conv2d(input_shape[0], width, 3, padding="same"), _activation(activation)]
    for _ in range(depth):
        layers += [gnn.LiResBlock(width, 3), _activation(activation)]
    layers += [gnn.Conv2d(width, 2 * width, 4, stride=4, padding="same"), _activation(activation), gnn.Flatten()]
    with torch.no_grad():
        features = gnn.Sequential(*layers)(torch.zeros((1,) + input_shape)).shape[1]
    layers += [gnn.Linear(features, 512), _activation(activation)]
    return GloroNet(gnn.Sequential(*layers), gnn.Linear(512, num_classes), epsilon,
                    input_shape=input_shape, **gloro_kwargs)


ARCHITECTURES: Dict[str, Callable[..., GloroNet]] = {
    "2C2F": cnn_2C2F,
    "4C3F": cnn_4C3F,
    "6C2F": cnn_6C2F,
    "8C2F": cnn_8C2F,
    "liresnet": liresnet,
}


def build(name: str, input_shape, num_classes: int, epsilon: float, **kwargs) -> GloroNet:
    """Build an architecture of :data:`ARCHITECTURES` by name."""
    check_choice("architecture", name, sorted(ARCHITECTURES))
    return ARCHITECTURES[name](input_shape=input_shape, num_classes=num_classes, epsilon=epsilon, **kwargs)
