"""gloro_fast: Globally-Robust Neural Networks (GloRo Nets) in PyTorch, made fast."""
from . import export, losses, models, nn, ops
from .model import GloroNet, GloroOutput

__version__ = "0.1.0"

__all__ = ["GloroNet", "GloroOutput", "export", "losses", "models", "nn", "ops", "__version__"]
