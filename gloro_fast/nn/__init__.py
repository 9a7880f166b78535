"""Drop-in Lipschitz-bounded layers with torch.nn constructor signatures."""
from .activations import MinMax, ReLU
from .base import LipschitzModule, PowerIterationModule
from .containers import Flatten, Sequential
from .conv import Conv2d, LiResBlock, same_padding
from .convert import from_torch
from .linear import Linear
from .pooling import AvgPool2d, MaxPool2d

__all__ = [
    "AvgPool2d",
    "Conv2d",
    "Flatten",
    "LiResBlock",
    "Linear",
    "LipschitzModule",
    "MaxPool2d",
    "MinMax",
    "PowerIterationModule",
    "ReLU",
    "Sequential",
    "from_torch",
    "same_padding",
]
