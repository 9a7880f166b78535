"""gloro_fast: Globally-Robust Neural Networks (GloRo Nets) in PyTorch, made fast."""
from . import export, losses, models, nn, ops
from ._validation import debug_enabled, set_debug
from ._version import __version__
from .gloro_net import GloroNet, GloroOutput

__all__ = ["GloroNet", "GloroOutput", "debug_enabled", "export", "losses", "models", "nn", "ops",
           "set_debug", "__version__"]
