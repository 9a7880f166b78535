"""gloro_fast: Globally-Robust Neural Networks (GloRo Nets) in PyTorch, made fast."""
from . import export, losses, models, nn, ops
from ._validation import debug_enabled, set_debug
from .model import GloroNet, GloroOutput

__version__ = "0.1.0"

__all__ = ["GloroNet", "GloroOutput", "debug_enabled", "export", "losses", "models", "nn", "ops",
           "set_debug", "__version__"]
